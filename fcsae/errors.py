"""One exception type for bad user input.

Anything a user can get wrong (a config value, a path, a corrupt file) raises
``FcsaeInputError`` with one line that names the field and what is allowed.
The CLIs turn it into ``fcsae: error: <line>`` and exit code 2.
"""


class FcsaeInputError(ValueError):
    """Bad user input: config values, flags, paths, corrupt files."""


def require(cond: bool, message: str) -> None:
    """Raise ``FcsaeInputError(message)`` unless ``cond`` holds."""
    if not cond:
        raise FcsaeInputError(message)
