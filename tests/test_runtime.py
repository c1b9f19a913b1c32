"""medjax.runtime: glibc allocator tuning, its switches, and its effect (freed big blocks are kept)."""

import json
import subprocess
import sys
import textwrap

import pytest

from medjax import runtime

# Allocates and frees a 256 MiB block in a fresh process and reports its resident set before and after
# the free (in MiB), after tune_allocator() saw the environment given as argv[1].
_PROBE = textwrap.dedent("""
    import ctypes, json, os, sys
    from medjax import runtime
    status = runtime.tune_allocator(json.loads(sys.argv[1]))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    size = 256 * 2**20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # Touch every page.
    held = rss_mib()
    libc.free(block)
    print(json.dumps({"status": status, "held": held, "after_free": rss_mib()}))
    """)


def _probe(environ: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(environ)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_switch_and_user_settings_leave_the_allocator_alone():
    assert runtime.tune_allocator({runtime.ENV_SWITCH: "0"}) == f"unchanged ({runtime.ENV_SWITCH}=0)"
    assert runtime.tune_allocator({"MALLOC_ARENA_MAX": "2"}).startswith("unchanged (glibc malloc variables")
    assert runtime.tune_allocator({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"}).startswith("unchanged")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_process_keeps_freed_memory_and_default_returns_it():
    tuned = _probe({})
    for name, (_, value) in runtime.SETTINGS.items():
        assert f"{name}={value}" in tuned["status"]
    assert "refused" not in tuned["status"]
    # Kept for the next step: the freed 256 MiB block stays resident instead of being unmapped.
    assert tuned["held"] - tuned["after_free"] < 16, tuned

    default = _probe({runtime.ENV_SWITCH: "0"})
    assert default["status"].startswith("unchanged")
    assert default["held"] - default["after_free"] > 200, default
