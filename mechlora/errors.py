"""User-facing errors: the CLI prints these as one clear message, without a traceback."""

from __future__ import annotations


class MechloraError(Exception):
    """A mistake the user can fix (bad input, bad option, missing file). Says what to do."""


class DataError(MechloraError):
    """A problem in a paraphrase data file, located by file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        field_part = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{field_part}{message}")
