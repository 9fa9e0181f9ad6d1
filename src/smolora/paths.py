"""Where SmoLoRA keeps what it builds once and reuses, and the one way it writes anything that must
appear whole or not at all: checkpoints, the model cache, adapters, merged models, GGUF files, the
compiled kernels."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from smolora.errors import SmoLoRAError

LOCK = ".smolora.lock"  # in an output folder while a process writes there
MARKER = "COMPLETE"  # written last into a folder that counts only once whole (checkpoints, the model cache)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def smolora_home() -> Path:
    """``$SMOLORA_HOME``, else ``~/.cache/smolora``."""
    return Path(os.environ.get("SMOLORA_HOME", Path.home() / ".cache" / "smolora"))


def publish(
    final: Path,
    write: Callable[[Path], None],
    *,
    folder: bool = True,
    marker: bool = False,
    keep_existing: bool = False,
) -> Path:
    """Make ``final`` appear whole or not at all.

    ``write(tmp)`` fills a temporary folder (or writes a temporary file) beside ``final``; it is
    synced, given the ``MARKER`` file last if asked, and renamed to ``final``, replacing what was
    there — unless ``keep_existing`` and a complete ``final`` appeared meanwhile (another process
    built the same thing first). Whatever goes wrong, the temporary is removed; temporaries that
    a killed process left beside ``final`` are removed first. What is written follows the umask.
    """
    final = Path(final)
    if final.is_symlink():
        raise SmoLoRAError(f"{final}: is a symbolic link; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = _beside(final, "tmp")
    if folder:
        tmp.mkdir()
    try:
        write(tmp)
        if marker:
            (tmp / MARKER).write_text("ok\n")
        _fsync(tmp)
        if keep_existing and complete(final):
            return final
        if folder and final.exists():  # a folder is not renamed over a non-empty one: swap the two
            old = _beside(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        _remove(tmp)
    return final


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block: a second SmoLoRA process that would write there at the
    same time is refused (where the system has ``flock``; the kernel drops it with the process)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(folder) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise SmoLoRAError(f"{path}: cannot take the output folder's lock ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise SmoLoRAError(
                f"{folder}: another smolora process (pid {owner}) is writing there; "
                "wait for it to finish or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def complete(path: Path) -> bool:
    """A folder ``publish`` wrote with its marker."""
    return (Path(path) / MARKER).is_file()


def remove_stale_temporaries(final: Path) -> None:
    """Remove what ``publish`` left beside ``final`` in a process that no longer runs (``kill -9``)."""
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and match["name"] == final.name and not _running(int(match["pid"])):
            _remove(path)


def unreadable_safetensors(path: Path) -> str | None:
    """Why the safetensors file at ``path`` does not read (its header), in a few words; None when it does."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header
        return str(e).splitlines()[0][:80] if str(e) else type(e).__name__
    return None


def _beside(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """``path`` on disk: a file; a folder's files and the folder itself."""
    for file in [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]:
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
