"""User-facing errors.

An ``ImmunizeError`` is bad input or a missing prerequisite: the CLI prints its message as one
line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class ImmunizeError(Exception):
    """A problem the user can fix; the message names the file, row or option at fault."""
