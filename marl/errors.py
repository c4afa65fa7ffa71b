"""The one exception type marl raises for bad user input.

The CLI turns a `MarlError` into a one-line message and exit code 2; any other
exception is a bug and keeps its traceback.
"""


class MarlError(Exception):
    """Bad input: the message names the problem and how to fix it, in one line."""
