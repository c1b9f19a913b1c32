"""Process settings that must be made before JAX and TensorFlow start: glibc's allocator on Linux.

XLA:CPU allocates every step's activations and temporaries afresh. glibc serves big blocks (above its
mmap threshold, or too big for a thread's arena) with new mmap'd pages and unmaps them when freed, so
each step page-faults all of its big buffers in again: on this project's 2-core CPU an elementwise op on
a 33.5 MB array took 10.1 ms instead of 1.5 ms, and the paper CNN's train step ran 911-936 instead of
1,149-1,174 images/s. Telling glibc to keep freed memory and to serve big blocks from one reusable heap
removes that cost, at the price of a higher resident set (memory freed by one step is kept for the next;
see README's performance table).

`tune_allocator()` does this with mallopt; entry points call it before importing JAX or TensorFlow
(the arena limit only holds for threads created afterwards). Set MEDJAX_TUNE_MALLOC=0 to leave the
allocator alone. Nothing is changed if the process sets glibc's MALLOC_* variables or preloads another
allocator itself, or off Linux/glibc.
"""

import ctypes
import ctypes.util
import os
import sys

ENV_SWITCH = "MEDJAX_TUNE_MALLOC"
# mallopt parameters (glibc's malloc.h) and the values medjax sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
SETTINGS = {
    # Keep up to 2 GiB of freed memory at the top of the heap instead of returning it to the OS.
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1),
    # Serve blocks up to 1 GiB from the heap (glibc's default threshold adapts up to 32 MiB only).
    "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 2**30),
    # One arena: blocks freed by XLA's worker threads are reused by the next step's (thread arenas
    # cannot grow past 64 MiB and fall back to mmap).
    "M_ARENA_MAX": (_M_ARENA_MAX, 1),
}
_GLIBC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

# What the last tune_allocator() call did, for logs and benchmark records.
status = "not called"


def tune_allocator(environ=None) -> str:
    """Applies SETTINGS through mallopt unless disabled or inapplicable; returns (and keeps) a status line."""
    global status
    environ = os.environ if environ is None else environ
    if environ.get(ENV_SWITCH, "1") == "0":
        status = f"unchanged ({ENV_SWITCH}=0)"
    elif not sys.platform.startswith("linux"):
        status = f"unchanged (platform {sys.platform})"
    elif any(name in environ for name in _GLIBC_VARIABLES):
        status = "unchanged (glibc malloc variables set in the environment)"
    elif "malloc" in environ.get("LD_PRELOAD", ""):
        status = "unchanged (an allocator is preloaded)"
    else:
        status = _apply()
    return status


def _apply() -> str:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unchanged (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = [name for name, (param, value) in SETTINGS.items() if mallopt(param, value) == 1]
    refused = [name for name in SETTINGS if name not in applied]
    return "glibc mallopt " + ", ".join(
        [f"{name}={SETTINGS[name][1]}" for name in applied] + [f"{name} refused" for name in refused]
    )
