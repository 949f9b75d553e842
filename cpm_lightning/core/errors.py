"""The one exception type for mistakes a user can make.

`cpm-lightning` catches `UserError` at the top, prints its message as one line and exits with
status 2. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: a config key, a file, a name. The message says what,
    where, and what was expected."""


def closest(name: str, valid) -> str:
    """' (did you mean X?)' when a valid name is close to `name`, else ''."""
    import difflib

    match = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def lookup(registry: dict, name: str, what: str):
    """registry[name], or a UserError that lists the valid names."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise UserError(f"unknown {what} {name!r}; expected one of: {valid}") from None
