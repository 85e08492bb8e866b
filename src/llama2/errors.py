"""The one exception type for problems a user can cause and fix."""


class Llama2Error(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it without a traceback."""
