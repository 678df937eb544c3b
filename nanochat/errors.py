"""The exception types for mistakes a user can fix (bad config values, missing files)."""

import contextlib


class UserError(Exception):
    """A user-fixable problem; the trainer prints the message and exits non-zero, no traceback."""


class InvalidArgument(UserError):
    """Arguments of a component that do not fit together, named by parameter.

    The component writes its rule once, with its parameters as {placeholders}; whoever built it
    from a config node renders them as that node's keys, so the same check reads
    `n_embd=250 is not divisible by n_head=3` in Python and `model.n_embd=250 is not divisible by
    model.n_head=3` on the command line.
    """

    def __init__(self, template: str, **values):
        self.template = template
        self.values = values
        super().__init__(self.render())

    def render(self, prefix: str = "") -> str:
        return self.template.format(**{name: f"{prefix}{name}={show(value)}" for name, value in self.values.items()})


@contextlib.contextmanager
def named_as(path: str):
    """Inside it, a component's InvalidArgument is re-raised naming the config node's keys."""
    try:
        yield
    except InvalidArgument as error:
        raise UserError(error.render(f"{path}.")) from None


def show(value) -> str:
    """A config value as it is written on the command line (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)
