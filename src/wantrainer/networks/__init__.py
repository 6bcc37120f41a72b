"""Trainable adapters for the Wan DiT and their file formats."""
