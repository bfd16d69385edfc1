"""The one exception tree of finetrace.

Every error a user can cause is a ``FinetraceError`` whose message is shown to the user as is, with a
``hint`` saying what to do next. The CLI and HTTP layers translate these at the edge (one line, non-zero
exit / an HTTP error body); library code never prints. ``assert`` is kept for internal invariants only.

    FinetraceError
    ├── WorkspaceError      no workspace, or an unusable one
    ├── NotFoundError       an artifact, run, model or object that does not exist
    ├── InputError          bad user input: a file, line, field or option (names where)
    │   └── ConfigError     a bad configuration key or value (names the key, suggests the right one)
    ├── IntegrityError      a digest, signature or ledger entry that does not match (names which)
    └── DependencyError     an optional dependency or capability that is missing here
"""

from __future__ import annotations


class FinetraceError(Exception):
    """Base class: ``str(err)`` is the message for the user, ``err.hint`` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class WorkspaceError(FinetraceError):
    """No workspace where one was expected, or a workspace that cannot be used."""


class NotFoundError(FinetraceError):
    """A named thing (artifact, run, model, object) does not exist."""

    exit_code = 2


class InputError(FinetraceError):
    """Bad input from the user; the message names the file, line, field or option."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        where = ":".join(str(p) for p in (file, line) if p is not None)
        if field:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.file, self.line, self.field = file, line, field


class ConfigError(InputError):
    """A configuration key or value that is wrong; names the key and suggests the closest valid one."""


class IntegrityError(FinetraceError):
    """Something stored does not match its digest, signature or Merkle root; names the first such thing."""

    exit_code = 3


class DependencyError(FinetraceError):
    """A capability that needs a package or hardware this machine does not have."""
