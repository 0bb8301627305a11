"""The one exception type for mistakes a user can fix (bad config, bad data, bad arguments)."""


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
