"""Errors shown to users: each message names the case(s) and says what to do."""

from __future__ import annotations


class OrthodiffError(RuntimeError):
    """Base class of user-facing errors (printed without traceback by the CLI)."""


class ConversionError(OrthodiffError):
    """One or more series failed validation; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], header: str = "conversion refused") -> None:
        self.problems = list(problems)
        text = f"{header}: {len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class ClassificationError(OrthodiffError):
    """Classification training or prediction cannot go on (splits, precision, checkpoints); the message says what to do."""
