"""The one exception type for mistakes a user can fix (bad config, bad data, bad arguments),
and the failures of the machine a run stands on (a full disk, a read-only folder)."""

import errno


class UserError(Exception):
    """A user-fixable error. Its message is one line that names the field and the value.

    The CLI turns it into that line on stderr and exit code 2; the server into a 4xx.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Worker processes send errors back pickled; keep both arguments.
        return (type(self), (self.field, self.message))


class RunFailure(Exception):
    """The run could not go on for a reason outside the user's input (a cluster that does not
    start, say): one line on stderr and exit code 1 from the CLI."""


# Errors of the machine, not of the input: the CLI names the path and the cause, exit 1.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


def storage_error(exc: BaseException) -> OSError | None:
    """The storage ``OSError`` behind ``exc`` (itself, its cause, or the cause a Ray task
    error wraps), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return None


def storage_message(exc: OSError) -> str:
    """One line: the path and the cause, e.g. ``/runs/a/model.safetensors: No space left on
    device (ENOSPC)``."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    path = exc.filename if exc.filename is not None else "(path unknown)"
    return f"{path}: {exc.strerror or 'I/O error'} ({name})"
