"""publish: whole or nothing, what a killed process left is cleaned, permissions follow the umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from smolora.errors import SmoLoRAError
from smolora.paths import MARKER, complete, publish


def test_a_crash_mid_write_leaves_what_was_there_and_no_temporary(tmp_path):
    final = tmp_path / "out" / "model"
    publish(final, lambda tmp: (tmp / "weights").write_text("old"), marker=True)

    def crash(tmp):
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(final, crash, marker=True)
    assert (final / "weights").read_text() == "old" and complete(final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]

    def crash_file(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # a file, too
        publish(tmp_path / "file.gguf", crash_file, folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_replaces_the_old_one_and_keep_existing_keeps_a_complete_one(tmp_path):
    final = tmp_path / "model"
    publish(final, lambda tmp: (tmp / "a").write_text("1"))
    publish(final, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["b"] and not complete(final)
    publish(final, lambda tmp: (tmp / "c").write_text("3"), marker=True)
    publish(
        final, lambda tmp: (tmp / "d").write_text("4"), marker=True, keep_existing=True
    )  # another process was first
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "c"]


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from smolora.paths import publish; "
        "publish(Path(sys.argv[1]), "
        "lambda tmp: ((tmp / 'w').write_text('x'), print('writing', flush=True), time.sleep(60)))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "model")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-")
    publish(tmp_path / "model", lambda tmp: (tmp / "w").write_text("y"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_what_is_written_follows_the_umask_and_symlinks_are_refused(tmp_path):
    previous = os.umask(0o022)
    try:
        folder = publish(tmp_path / "model", lambda tmp: (tmp / "w").write_text("x"))
        file = publish(tmp_path / "f.gguf", lambda tmp: tmp.write_text("x"), folder=False)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755 and file.stat().st_mode & 0o777 == 0o644
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SmoLoRAError, match="symbolic link"):
        publish(tmp_path / "link", lambda tmp: None)
    assert not (tmp_path / "elsewhere").exists()  # nothing written through it
