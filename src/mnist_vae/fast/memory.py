"""Memory that the products' outputs come back to: glibc's malloc told to keep what it frees.

Each product through oneDNN returns a new tensor, and the estimate's decoder makes outputs of
megabytes (1024 rows of 784 logits: 3 MB) at every chunk. glibc's malloc serves blocks that
large with mmap and gives them back to the system on free (or trims its heap), so each new
output starts on fresh pages that the kernel must fault in and zero, one by one; on a virtual
machine that costs as much as the arithmetic. Raising malloc's mmap and trim thresholds keeps
freed blocks in the process's heap for the next output of the same size, as PyTorch's own
performance guide gets by preloading jemalloc or tcmalloc. Memory freed is then kept for
reuse, not returned, so the process holds its peak; no number computed changes.
"""

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 512 << 20


@functools.lru_cache(maxsize=None)
def keep_freed_memory():
    """Set glibc's thresholds once per process; True where they were set (Linux with glibc), else False."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: macOS, Windows, musl
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
