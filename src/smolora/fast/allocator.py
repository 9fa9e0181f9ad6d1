"""The memory allocator the command line trains with: tcmalloc where the system has it (Linux).

A training step frees and reallocates every activation of every row. glibc's malloc leaves the
freed space scattered among small long-lived objects (autograd nodes, Python objects), so the next
row's tensors do not fit in it and the heap grows; tcmalloc keeps large blocks apart from small
ones and reuses them: a lower peak, the same speed and the same losses (benchmarks/RESULTS.md).

The allocator has to be chosen before the process starts, so ``smolora`` re-runs itself once
with ``LD_PRELOAD`` set (the same process id, so signals and torchrun see one process).
``SMOLORA_ALLOCATOR=system`` keeps glibc's. Nothing happens where tcmalloc is not installed
(Debian/Ubuntu: ``apt install libtcmalloc-minimal4``; Fedora: ``gperftools-libs``), on macOS or
Windows, or when ``LD_PRELOAD`` already names an allocator. A Python program using the API runs
on the allocator its interpreter started with (``LD_PRELOAD=libtcmalloc_minimal.so.4 python train.py``).
"""

from __future__ import annotations

import ctypes.util
import gc
import os
import sys

ENV = "SMOLORA_ALLOCATOR"  # "system": keep glibc's malloc; set to "tcmalloc" once the re-run is done
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library's name as the dynamic loader finds it, or None."""
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to run a new SmoLoRA process with tcmalloc, or None where nothing changes."""
    env = dict(os.environ if environ is None else environ)
    preload = env.get("LD_PRELOAD", "")
    if (
        not sys.platform.startswith("linux")
        or env.get(ENV) in ("system", "tcmalloc")
        or any(k in preload for k in _KNOWN)
    ):
        return None
    library = find_tcmalloc()
    if library is None:
        return None
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env[ENV] = "tcmalloc"
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no stderr line per GiB-sized block
    return env


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc (returns only where nothing changes)."""
    env = preload_env()
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def active() -> str:
    """Which allocator this process runs on: "tcmalloc" or "system"."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if "tcmalloc" in maps.read() else "system"
    except OSError:
        return "system"


def release_free_memory() -> None:
    """Hand the pages the allocator holds free back to the system, after a one-off peak (a model
    conversion): tcmalloc keeps them for reuse otherwise, and a later peak lands on top of them.
    Objects in reference cycles (a model's modules) are collected first."""
    gc.collect()
    try:
        process = ctypes.CDLL(None)  # the symbols this process has loaded
    except (OSError, TypeError):  # Windows has no such handle
        return
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):  # tcmalloc; glibc
        if hasattr(process, name):
            getattr(process, name)(*args)
            return
