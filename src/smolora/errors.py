"""The one exception type users see: a clear, one-line message about their input."""


class SmoLoRAError(ValueError):
    """Bad input or settings. The CLI prints the message on one line and exits with code 2.

    Messages quote user data (field names, values), which may hold line breaks: they are escaped
    here so the message always stays on one line.
    """

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
