"""Process-wide settings of the running process (not of any result).

glibc serves every allocation above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with
fresh pages from the kernel and returns them on free, so each large temporary (a layer's [batch, tokens,
d_mlp] activations, a vocabulary-sized logits tensor) is page-faulted in again at every step. Raising the
threshold and the trim threshold keeps those pages in the heap for reuse. It changes where tensors live,
not what is computed (benchmarks/bench_allocator.py compares the tokens and times both in one process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # 1 GiB: anything smaller comes from (and goes back to) the heap
TRIM_THRESHOLD = 1 << 36  # never hand the heap's top back to the kernel
TOP_PAD = 1 << 26  # grow the heap 64 MiB at a time


def tune_allocator() -> bool:
    """Keep large temporaries' pages in glibc's heap (see the module). Off with DPOLENS_MALLOC=default, and
    wherever the C library is not glibc. Returns whether the settings were applied."""
    if os.environ.get("DPOLENS_MALLOC", "tuned") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    log.debug("glibc allocator tuned: %s", ok)
    return ok
