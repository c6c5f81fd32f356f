"""The base of every expected failure of a command: `main` prints its message as one line, no traceback."""


class CommandError(RuntimeError):
    """An expected failure; the message says what is wrong and what to do."""
