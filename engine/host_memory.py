"""Host allocator tuning: keep large freed CPU tensors in the heap so the next step reuses them.

A scale step allocates tens of MB of temporaries per layer (qkv, the MLP hidden, attention
outputs). glibc serves every block above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and unmaps
it on free, so each of them is page-faulted in again, zero-filled by the kernel, every layer of
every step: 25-30% of the engine's CPU time was ``sys`` at batch 32 (measured in
``benchmarks/RESULTS.md``). Raising the mmap threshold and the trim threshold (``mallopt``, the
runtime form of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) makes glibc keep such
blocks in its heap and hand them out again: a process-wide buffer cache with no change to the
numbers computed. The cost is that the heap keeps its high-water mark (the step's peak
temporaries) instead of returning it to the OS, which is what a serving process wants.

Chosen over tcmalloc/jemalloc via ``LD_PRELOAD`` because it needs no extra library and no
launcher: the CLI, the workers and the tests all build an ``ImageEngine``, which calls
:func:`tune_host_malloc` (``EngineConfig.host_malloc``: ``tuned`` by default, ``system`` leaves
glibc as it is). Only glibc on Linux is touched; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size stay in the heap (a step's largest temporary at var-d30 batch 64 is
# well below); the same value as the trim threshold so freed tops are not given back.
_THRESHOLD = 1 << 30

_done: bool | None = None


def tune_host_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or an unusual libc: leave it alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    log.debug("glibc mallopt mmap/trim thresholds %s", "set" if ok else "refused")
    _done = ok
    return ok
