"""User-facing errors.

An ``ImmunizeError`` is bad input or a missing prerequisite: the CLI prints its message as one
line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class ImmunizeError(Exception):
    """A problem the user can fix; the message names the file, row or option at fault."""


class Interrupted(Exception):
    """A run stopped on a signal after saving a checkpoint; re-running the same command resumes it.

    The CLI prints the message as one line and exits with ``128 + signal`` (143 for SIGTERM), the
    status a scheduler reads as "pre-empted" rather than "failed"."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number
