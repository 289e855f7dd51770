"""User-facing errors: one line that names the file, the field and the fix."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it as one line, no traceback, exit 2."""

    def __init__(self, what: str, *, source: str | None = None, field: str | None = None,
                 fix: str | None = None):
        self.what, self.source, self.field, self.fix = what, source, field, fix
        super().__init__(self.line())

    def line(self) -> str:
        where = ": ".join(p for p in (self.source, self.field) if p)
        text = f"{where}: {self.what}" if where else self.what
        return f"{text} (fix: {self.fix})" if self.fix else text
