"""``mrcnn_edu.utils.keep_freed_memory``: glibc's malloc keeps freed blocks for reuse.

Measured in fresh processes with glibc's own counters: ``mallinfo2().hblkhd`` (bytes held in
separate ``mmap`` blocks) and the minor page faults the process takes (``getrusage``).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, json, resource, sys
import torch
from mrcnn_edu.utils import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                              "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory() if sys.argv[1] == "call" else None
shape = (4, 64, 256, 256)  # 64 MiB of float32: above glibc's largest dynamic mmap threshold
before = libc.mallinfo2().hblkhd
x = torch.ones(shape)
mapped = libc.mallinfo2().hblkhd - before
del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(3, 64, 256, 256)  # the next step's 48 MiB: fits in the freed 64
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"tuned": tuned, "mapped": mapped, "faults": faults}))
"""

PAGES = 48 * 2**20 // 4096  # of the second tensor


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
        ctypes.CDLL(None).mallinfo2  # noqa: B018 - glibc >= 2.33
    except AttributeError:
        return False
    return sys.platform.startswith("linux")


def _run(call: bool, **env: str) -> dict:
    # one thread: with more, the kernel's own background faults (e.g. NUMA balancing) blur
    # the count
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "call" if call else "skip"],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_activations_stay_mapped_for_the_next_step():
    plain = _run(call=False)
    # glibc's default: a block this large is its own mmap, unmapped on free, and a new one
    # faults all its pages in again
    assert plain["mapped"] >= 64 * 2**20, plain
    assert plain["faults"] > 0.9 * PAGES, plain
    tuned = _run(call=True)
    assert tuned["tuned"] is True, tuned
    assert tuned["mapped"] == 0, tuned  # from the heap, not a separate mapping
    assert tuned["faults"] < 0.05 * PAGES, tuned  # the freed block's pages are reused


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_the_environment_switch_leaves_malloc_alone():
    off = _run(call=True, MRCNN_EDU_MALLOC="0")
    assert off["tuned"] is False, off
    assert off["mapped"] >= 64 * 2**20 and off["faults"] > 0.9 * PAGES, off
