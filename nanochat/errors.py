"""The one exception type for mistakes a user can fix (bad config values, missing files)."""


class UserError(Exception):
    """A user-fixable problem; the trainer prints the message and exits non-zero, no traceback."""
