"""The one exception type users see: a clear, one-line message about their input."""


class SmoLoRAError(ValueError):
    """Bad input or settings. The CLI prints the message on one line and exits with code 2."""
