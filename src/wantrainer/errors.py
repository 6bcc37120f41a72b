"""Exceptions that mean "the user must change something" (exit code 2, no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, files or command line.

    The CLI prints the message (no traceback) and exits with code 2. The message should name the key or
    file, say what is wrong and what to do.
    """

    exit_code = 2


class ConfigError(UserError):
    """One or more problems found in a config file, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''}{where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class MediaError(Exception):
    """A media file could not be read or decoded. Callers skip the file and report it."""
