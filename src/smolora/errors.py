"""The one exception type users see: a clear, one-line message about their input."""

import os
from pathlib import Path


class SmoLoRAError(ValueError):
    """Bad input or settings. The CLI prints the message on one line and exits with code 2.

    Messages quote user data (field names, values), which may hold line breaks: they are escaped
    here so the message always stays on one line.
    """

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def reason(error: BaseException) -> str:
    """An error in a few words, on one line."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_mismatch(e: Exception) -> str:
    """The line of a (many-line) state-dict load error that says what did not fit."""
    lines = str(e).strip().splitlines()
    return next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)


def check_writable_file(path: Path, what: str) -> None:
    """Refuse an output file name that cannot be written: a folder, or under something that is not a
    writable folder. Missing folders above it are fine (the writer makes them)."""
    if path.is_dir():
        raise SmoLoRAError(f"{what} {path}: is a folder; expected a file name")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise SmoLoRAError(f"{what} {path}: cannot write there ({folder} is not a writable folder)")


def check_writable_place(path: Path, what: str) -> None:
    """Refuse an output that cannot be written where it is to appear: beside ``path``, under the
    nearest folder that exists (checked before any work, not after it)."""
    folder = next((p for p in Path(path).absolute().parents if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise SmoLoRAError(f"{what} {path}: cannot write there ({folder} is not a writable folder)")
