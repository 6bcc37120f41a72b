"""Shared pytest fixtures: tiny real models and synthetic media, built once per session."""

from __future__ import annotations

import os

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
