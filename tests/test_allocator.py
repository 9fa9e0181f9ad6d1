"""The command's allocator: tcmalloc by a re-exec where the system has it, never twice, never forced."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from smolora.fast import allocator


@pytest.fixture
def found(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "platform", "linux")


def test_preload_env_adds_tcmalloc_once(found):
    env = allocator.preload_env({"PATH": "/bin"})
    assert (
        env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env[allocator.ENV] == "tcmalloc" and env["PATH"] == "/bin"
    )
    assert allocator.preload_env(env) is None  # the re-run process does not run again
    kept = allocator.preload_env({"LD_PRELOAD": "libfoo.so"})
    assert kept["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libfoo.so"


@pytest.mark.parametrize("environ", [{allocator.ENV: "system"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_preload_env_leaves_a_choice_alone(found, environ):
    assert allocator.preload_env(environ) is None


def test_preload_env_nothing_to_load(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.preload_env({}) is None
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc.so.4")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.preload_env({}) is None


@pytest.mark.parametrize("choice", [None, "system"])
def test_reexec_in_a_real_process(choice):
    """The process runs itself again, in place, on tcmalloc where it is installed; not when told not to."""
    code = (
        "import os; from smolora.fast import allocator; allocator.reexec_with_tcmalloc(); "
        "print(os.getpid(), allocator.active())"
    )
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, "LD_PRELOAD")}
    if choice:
        env[allocator.ENV] = choice
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    want = "tcmalloc" if choice is None and allocator.find_tcmalloc() and sys.platform.startswith("linux") else "system"
    assert out.split() == [str(proc.pid), want]  # one line: the same process, on the allocator asked for
