"""glibc malloc, tuned for tensor work on the CPU: large freed blocks are kept for reuse, not returned to the kernel.

With glibc's defaults, a tensor of more than a few MB is mmapped when it is allocated and unmapped when it is freed
(or trimmed off the heap), and every thread allocates from its own arena of 64 MB heaps. A forward pass allocates
and frees many such tensors (a layer's activations for a batch of images, a prefill chunk's MLP), so every pass
page-faults all of them again and the kernel zeroes each page. Measured on the bench CLIP (224 px) at batch 16:
35,000 minor faults per image (about 140 MB touched afresh) on the main thread and 28,000 on a worker thread; with
the settings below, none once warm. `LLM.generate` of 48 bench images (one output token each) faulted 1.39 million
times with the defaults and 0.1 million tuned, and took 13.8-14.3 s tuned against 15.6-16.4 s (two runs each,
interleaved); decoding was unchanged (BENCHMARKS.md).

The settings: one arena for all threads (a worker thread's arena cannot hold a large block), and the mmap and trim
thresholds raised to 1 GiB (a freed block stays in the heap for the next allocation of its size). That is what
preloading jemalloc or tcmalloc does for PyTorch CPU inference, without a library to install. The cost: memory freed
by tensors stays in the process (its RSS keeps its peak) instead of going back to the operating system.

Applied by the services at start-up (on any device) and by `LLM` on the CPU; `MMSERVE_MALLOC_TUNING=0` turns it
off. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

logger = logging.getLogger(__name__)

ENV_VAR = "MMSERVE_MALLOC_TUNING"
# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap, and this much free is kept

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet


def tune_malloc_for_tensors() -> bool:
    """Apply the settings above once per process; True when they are in effect.

    Call it before the process starts its worker threads: a thread that already allocated keeps its own arena.
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no"):
        logger.info("malloc tuning off (%s=%s): glibc's defaults apply", ENV_VAR, os.environ[ENV_VAR])
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP_BYTES), (_M_TRIM_THRESHOLD, _KEEP_BYTES))
    failed = [parameter for parameter, value in settings if libc.mallopt(parameter, value) != 1]
    if failed:
        logger.warning("mallopt refused parameters %s: glibc's defaults apply to them", failed)
        return False
    logger.info("malloc tuned for tensors: one arena, freed blocks up to 1 GiB kept for reuse (%s=0 to turn off)",
                ENV_VAR)  # fmt: skip
    return True
