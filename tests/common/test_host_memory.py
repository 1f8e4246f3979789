"""common/host_memory.py: malloc tuned for tensor work keeps large freed blocks for reuse.

Each case runs in a fresh interpreter, since the tuning is process-wide and applies once. The measure is the
kernel's count of minor page faults while a worker thread allocates, fills and frees a 40 MB block ten times (what
a forward pass does with its large temporaries): with glibc's defaults every round faults every page in again;
tuned, the block is reused and no round faults.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from common.host_memory import ENV_VAR

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc malloc"
)

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import ctypes, json, resource, threading
from common.host_memory import tune_malloc_for_tensors

tuned = tune_malloc_for_tensors()
tune_malloc_for_tensors()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 40 << 20
result = {"tuned": tuned}


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rounds():
    block = libc.malloc(SIZE); libc.memset(block, 1, SIZE); libc.free(block)  # the first one faults in any case
    before = faults()
    for _ in range(10):
        block = libc.malloc(SIZE); libc.memset(block, 1, SIZE); libc.free(block)
    result["pages_faulted_per_round"] = (faults() - before) / 10 / (SIZE >> 12)


worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(json.dumps(result))
"""


def probe(env_value: str | None) -> dict[str, float]:
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    if env_value is not None:
        env[ENV_VAR] = env_value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_tuned_malloc_reuses_a_large_freed_block_without_page_faults() -> None:
    result = probe(None)
    assert result["tuned"] is True
    assert result["pages_faulted_per_round"] < 0.05


@pytest.mark.parametrize("off", ["0", "off"])
def test_turned_off_glibc_defaults_fault_the_block_in_every_round(off: str) -> None:
    # The negative control: the same rounds on glibc's defaults (mmap per allocation) fault every page each time.
    result = probe(off)
    assert result["tuned"] is False
    assert result["pages_faulted_per_round"] > 0.9
