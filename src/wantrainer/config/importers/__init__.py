"""``wantrainer config import FILE... --from musubi|takenoko -o new.toml``: another trainer's files -> our config.

Each importer returns the config as TOML data and one ``Dropped`` per key that has no equivalent here, with the
reason; nothing is left out silently. The result is validated by our schema before it is written; a value our
schema refuses is dropped and listed with the schema's message.
"""

from __future__ import annotations

from .common import Dropped, ImportResult, import_files

__all__ = ["Dropped", "ImportResult", "import_files"]
