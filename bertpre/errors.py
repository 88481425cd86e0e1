"""The one exception type for mistakes a user can fix (bad path, bad option, bad data)."""


class UserError(ValueError):
    """A problem with the user's input. The CLI prints its message as one line and exits 2."""
