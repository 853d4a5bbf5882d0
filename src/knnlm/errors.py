"""The one exception type that the CLI turns into a single `error: ...` line."""


class KnnlmError(Exception):
    """Bad input or state the user can fix; the message says what and how."""
