"""Process-level settings for CPU runs.

PyTorch's CPU tensors come straight from the C allocator. glibc serves every block above its mmap threshold
(128 KB, rising dynamically to at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, and
frees at the top of the heap beyond 128 KB are trimmed back to the kernel. A UNet pass at SD1.5 sizes allocates
and frees gigabytes of 10–80 MB activations, so each one is page-faulted in again on first touch: measured on a
2-core AMD EPYC (AVX2), one 512² CFG UNet forward takes ~19 s with glibc's defaults and ~16 s with the settings
below (bench/unet_cpu.py, both models in one process, so diffusers gains alike). Peak RSS is unchanged: the
freed blocks are reused by the next step instead of being returned and faulted in again.

This changes the whole process, so the library never does it on import: the command-line tools call
:func:`tune_cpu_allocator` for CPU runs (``--no-tune-allocator`` keeps glibc's defaults), and an embedding
application may call it at start-up.

:func:`prepack_convs` is the other CPU setting: it trades a second copy of the UNet's conv weights for skipping
oneDNN's weight reorder on every conv call (composer/layers.py ``Conv2d``); the command-line tools apply it on CPU
in fp32 (``--no-prepack`` keeps the memory).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("composer")

# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_LIMIT = 2**31 - 1  # as large as the int argument allows: never trim, never mmap


def tune_cpu_allocator() -> bool:
    """Keep freed CPU memory in the heap for reuse (glibc only; elsewhere a no-op). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, _LIMIT))
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping the defaults")
    return ok


def prepack_convs(model, on: bool = True) -> int:
    """Keep the conv weights of ``model`` (its composer/layers.py ``Conv2d`` layers) in oneDNN's blocked layout for
    CPU fp32 inference (``Conv2d.prepack``): faster UNet passes, above all at small sizes, for a second copy of the
    conv weights in memory (2.4 GB for SD1.5's UNet in fp32). ``on=False`` drops the copies. Gradients and other
    devices and dtypes always take the plain path. Returns the number of layers changed."""
    from .layers import Conv2d
    n = 0
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.prepack = on
            if not on:
                m._packed = None
            n += 1
    return n
