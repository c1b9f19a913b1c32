"""Process settings that must be made before JAX and TensorFlow start: glibc's allocator on Linux
(`tune_allocator`), XLA:CPU's convolution library (`tune_xla`) and where JAX runs CPU computations
(`tune_dispatch`); `tune_process` does all three.

XLA:CPU allocates every step's activations and temporaries afresh. glibc serves big blocks with new
mmap'd pages and unmaps them when freed, so each step page-faulted all of its big buffers in again, 4 KiB
at a time: on this project's 2-core CPU an elementwise op on a 33.5 MB array took 10.1 ms instead of
1.5 ms, and the paper CNN's train step ran 911-936 instead of 1,149-1,174 images/s. `tune_allocator()`
removes that cost, the first way that applies:

1. Glibc tunables (glibc >= 2.35 and the kernel's transparent-huge-page mode `madvise`): `hugetlb=1`
   makes big blocks fault in 2 MiB at a time, and `mmap_threshold` and `trim_threshold` of the machine's
   memory size make the main arena serve every block from its heap and keep freed memory there for the
   next step (`release_free_memory()` returns it on demand). What is kept never exceeds the peak the
   process reached; with 1 GiB instead, ResNet-18 (3x3 stem)'s ~3.5 GB temporary buffer was still mapped
   and zeroed afresh every step (1,764 huge-page faults and 1.1-2.3 s of system time a step: 23-27
   against 28-29 images/s in alternating processes, peak RSS 4.5 GB either way). The tunables are only
   read when a process starts, so `tune_allocator()` puts them in GLIBC_TUNABLES and re-executes the
   process once, with the same command line, before anything else has run (entry points call it first
   thing).
   Huge pages alone, against way 2 (same machine, alternating runs): paper CNN 1,345-1,408 vs
   1,309-1,363 images/s at a peak RSS of 641-729 vs 776-1,036 MiB; ResNet-18 (7x7 stem) 326-332 vs
   317-320 images/s at 1,401-1,478 vs 1,758-2,134 MiB.
2. Else (THP off, older glibc, or `reexec=False`), mallopt: keep freed memory and serve big blocks from
   one reusable heap shared by all threads. As fast, but memory freed by one step is kept for the next,
   and the heap's fragmentation makes the peak resident set vary from run to run.

Where the kernel's THP mode is `always`, big blocks get huge pages anyway and nothing is changed. Set
MEDJAX_TUNE_MALLOC=0 to leave the allocator alone. Nothing is changed either if the process sets glibc's
MALLOC_* variables or GLIBC_TUNABLES or preloads another allocator itself, or off Linux/glibc.

The main arena's heap matters because of where XLA:CPU allocates a step's temporary buffer (one block:
116 MB for the paper CNN at batch 128): on the thread that runs the computation. With JAX's default
asynchronous dispatch that is a PjRt worker thread, whose glibc arena cannot hold blocks over 64 MiB, so
the block was mapped, zeroed by the kernel (55 huge pages) and unmapped every step: 9-19 ms of CPU time
per paper-CNN step. `tune_dispatch()` (with way 1 only) runs CPU computations on the calling thread
instead, whose allocations come from the main arena, so the block is reused.
"""

import ctypes
import ctypes.util
import os
import sys

ENV_SWITCH = "MEDJAX_TUNE_MALLOC"


def _physical_memory_bytes() -> int:
    """This machine's memory (1 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2**30


# Blocks below this size come from the main arena's heap, which keeps up to this much freed memory.
HEAP_KEEP_BYTES = _physical_memory_bytes()
TUNABLES = ":".join(
    [
        "glibc.malloc.hugetlb=1",  # Transparent huge pages for malloc's blocks.
        f"glibc.malloc.mmap_threshold={HEAP_KEEP_BYTES}",
        f"glibc.malloc.trim_threshold={HEAP_KEEP_BYTES}",
    ]
)
_REEXEC_MARK = "MEDJAX_ALLOCATOR_REEXEC"  # Set in the re-executed process: its GLIBC_TUNABLES is ours.
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
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

XLA_SWITCH = "MEDJAX_TUNE_XLA"
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# YNN_FUSION_FLAG's value that takes convolutions away from YNNPACK (to XLA:CPU's own kernels).
YNN_WITHOUT_CONVOLUTIONS = "-individual_convolution"
VECTOR_WIDTH_FLAG = "xla_cpu_prefer_vector_width"
FUSION_EMITTERS_FLAG = "xla_cpu_use_fusion_emitters"
# YNN_FUSION_FLAG as a per-compilation option: the list of operation types YNNPACK takes (it replaces
# the XLA_FLAGS list); reductions only leaves both convolutions and dots to XLA:CPU's own kernels.
YNN_REDUCTIONS_ONLY = "LIBRARY_FUSION_TYPE_REDUCE"
# XLA:CPU options for compiling a model's steps, by config.model.name (see cpu_compiler_options).
MODEL_XLA_CPU_OPTIONS = {"paper_cnn": {FUSION_EMITTERS_FLAG: False, YNN_FUSION_FLAG: YNN_REDUCTIONS_ONLY}}


def _has_avx512() -> bool:
    """Whether this CPU has AVX-512 (Linux's /proc/cpuinfo flags; False where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def _xla_cpu_flags() -> dict:
    """The XLA:CPU flags `tune_xla` adds on this machine, name -> value."""
    # Leaves convolutions to XLA:CPU's own (Eigen) kernels; dots, reductions and elementwise ops stay in
    # YNNPACK.
    flags = {YNN_FUSION_FLAG: YNN_WITHOUT_CONVOLUTIONS}
    if _has_avx512():
        # XLA's own loops (fusions) in 512-bit vectors instead of XLA's default 256 (see tune_xla).
        flags[VECTOR_WIDTH_FLAG] = "512"
    return flags


_XLA_CPU_FLAG_VALUES = _xla_cpu_flags()
XLA_CPU_FLAGS = " ".join(f"--{name}={value}" for name, value in _XLA_CPU_FLAG_VALUES.items())
# What the last tune_xla() call did.
xla_status = "not called"

DISPATCH_SWITCH = "MEDJAX_TUNE_DISPATCH"
# What the last tune_dispatch() call did.
dispatch_status = "not called"


def _xla_flag_values(flags: str) -> dict:
    """XLA_FLAGS' --name=value entries, name -> value (the last one where a name repeats)."""
    values = {}
    for flag in flags.split():
        name, _, value = flag.removeprefix("--").partition("=")
        values[name] = value
    return values


def xla_own_convolutions(environ=None) -> bool:
    """Whether XLA_FLAGS hands convolutions to XLA:CPU's own kernels rather than YNNPACK's, as `tune_xla`
    does (its YNN_WITHOUT_CONVOLUTIONS value). Which of the two runs them changes which convolution
    method is fastest, so `medjax.models.layers` asks when it plans a convolution."""
    environ = os.environ if environ is None else environ
    value = _xla_flag_values(environ.get("XLA_FLAGS", "")).get(YNN_FUSION_FLAG)
    return value is not None and YNN_WITHOUT_CONVOLUTIONS in value.split(",")


def tune_allocator(environ=None, reexec: bool = True) -> str:
    """Tunes glibc's allocator as the module docstring says (re-executing the process when the huge-page
    tunable needs it and `reexec` allows); returns (and keeps in `status`) a line saying what was done."""
    global status
    real_environment = environ is None
    environ = os.environ if environ is None else environ
    thp_mode = _thp_mode()
    if environ.get(ENV_SWITCH, "1") == "0":
        status = f"unchanged ({ENV_SWITCH}=0)"
    elif not sys.platform.startswith("linux"):
        status = f"unchanged (platform {sys.platform})"
    elif environ.get(_REEXEC_MARK) == "1" and environ.get("GLIBC_TUNABLES") == TUNABLES:
        status = f"GLIBC_TUNABLES={TUNABLES} (transparent huge pages: {thp_mode})"
    elif any(name in environ for name in _GLIBC_VARIABLES):
        status = "unchanged (glibc malloc variables set in the environment)"
    elif "malloc" in environ.get("LD_PRELOAD", ""):
        status = "unchanged (an allocator is preloaded)"
    elif thp_mode == "always":
        status = "unchanged (transparent huge pages: always)"
    elif thp_mode == "madvise" and _glibc_version() >= (2, 35) and reexec and real_environment:
        _reexecute_with_tunables()  # Returns only if the re-exec failed.
        status = _apply() + " (re-exec for huge pages failed)"
    else:
        status = _apply()
    return status


def tune_xla(environ=None) -> str:
    """Adds those of `XLA_CPU_FLAGS` that XLA_FLAGS does not name yet to XLA_FLAGS (read when JAX's backend
    starts); returns (and keeps in `xla_status`) a line saying what was done.

    jaxlib 0.10 hands each convolution to YNNPACK, which ran the small ones on one of this project's two
    cores (the same time under `taskset -c 0`), while XLA's own convolution uses both: 128x32x32, 16 -> 32
    channels, 3x3: forward 6.5 -> 4.3 ms, input gradient 7.5 -> 5.8 ms; 16x16, 32 -> 64: 5.3 -> 3.4 ms;
    3x3/2, 64 -> 128 at 16x16: 6.2 -> 3.0 ms. (ResNet's 7x7/2 grayscale stem is the exception: 5.4-6.2 ->
    10.1-11.1 ms, ~1% of its step.)

    On AVX-512 CPUs, `--xla_cpu_prefer_vector_width=512` lets XLA's own loops (batch norm, pooling and the
    other fusions) use 512-bit vectors instead of XLA's default 256 (a default that suits CPUs that slow
    down in 512-bit code; this project's Zen 5 does not). Paper CNN with inline dispatch, five pairs of
    alternating processes: 2,096-2,159 vs 1,963-2,071 images/s in the three fast-mode pairs, 1,624-1,682
    vs 1,483-1,490 in two slow-mode ones (faster in all five); ResNet-18 7x7 382 / 367 / 380 vs 307 / 375 /
    364; the conv32/64 net 1,327 / 1,287 vs 1,288 / 1,264. (Before the inline dispatch, eight pairs
    differed by 1%, within that noise.)

    The flags only concern the CPU backend. Nothing is changed if MEDJAX_TUNE_XLA=0, if XLA_FLAGS already
    names every flag, or if JAX's backend has started (then it is too late for this process).
    """
    global xla_status
    real_environment = environ is None
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    named = _xla_flag_values(flags)
    missing = [f"--{name}={value}" for name, value in _XLA_CPU_FLAG_VALUES.items() if name not in named]
    if environ.get(XLA_SWITCH, "1") == "0":
        xla_status = f"unchanged ({XLA_SWITCH}=0)"
    elif not missing:
        xla_status = f"unchanged (XLA_FLAGS sets {', '.join(_XLA_CPU_FLAG_VALUES)})"
    elif real_environment and _jax_backend_started():
        xla_status = "unchanged (JAX's backend had already started)"
    else:
        environ["XLA_FLAGS"] = " ".join([flags] + missing).strip()
        xla_status = f"XLA_FLAGS={environ['XLA_FLAGS']}"
    return xla_status


def cpu_compiler_options(model_name: str) -> dict:
    """XLA options for `jax.jit(..., compiler_options=...)` of model `model_name`'s train and eval steps:
    `MODEL_XLA_CPU_OPTIONS[model_name]` when JAX's backend is the CPU, less any option that XLA_FLAGS sets
    to a value of the user's (a value `tune_xla` put there may be refined per model); none if
    MEDJAX_TUNE_XLA=0 or on GPU/TPU.

    The paper CNN's fusions (batch norm, ReLU and pooling, kernel-gradient patches, the optimizer update)
    are compiled by XLA's LLVM IR emitters instead of its newer MLIR ones (`xla_cpu_use_fusion_emitters`
    false). Its train step, in alternating processes on this project's 2-core Zen 5: faster in 15 of 16
    pairs, 2,254-2,400 vs 2,180-2,287 images/s in the fast-mode ones (+4-5% on the median), compile 2.6
    instead of 4.4 s. ResNet-18 ran slower with them (7x7 stem 356-365 vs 368-380 images/s, 3x3 stem 23
    vs 25-27), so other models keep XLA's default.

    The paper CNN's matmuls (the kernel-gradient patches times the cotangent, Winograd's products, the
    dense layers) are XLA's own (Eigen's) instead of YNNPACK's: YNNPACK keeps reductions only
    (`YNN_REDUCTIONS_ONLY`). Alternating live workers: 1.06x (faster in 16 of 16 blocks, 2,482 vs 2,347
    images/s) and 1.05x (14 of 14). ResNet-18 7x7 ran 0.96x with it (0 of 12 blocks faster), so it
    keeps YNNPACK's matmuls. A per-compilation option, unlike an XLA_FLAGS entry, leaves every other
    program in the process alone.
    """
    import jax

    if os.environ.get(XLA_SWITCH, "1") == "0" or jax.default_backend() != "cpu":
        return {}
    flags = _xla_flag_values(os.environ.get("XLA_FLAGS", ""))
    options = MODEL_XLA_CPU_OPTIONS.get(model_name, {})
    return {
        name: value
        for name, value in options.items()
        if name not in flags or flags[name] == _XLA_CPU_FLAG_VALUES.get(name)
    }


def tune_dispatch() -> str:
    """Makes JAX run CPU computations on the calling thread (`jax_cpu_enable_async_dispatch=False`) when
    `tune_allocator()` set glibc's tunables (see the module docstring); returns (and keeps in
    `dispatch_status`) a line saying what was done.

    Paper CNN, four pairs of alternating processes (2-core CPU, batch 128): 1,782-1,995 vs 1,386-1,781
    images/s (faster in every pair), 0-12 page faults a step instead of 330-560 (55 of them huge), peak
    RSS unchanged (734-776 vs 770-790 MiB); run inline without the tunables, the step was as fast as with
    asynchronous dispatch. The caller waits for each computation, so host work between steps no longer
    overlaps a CPU step (the training loop's: taking the next batch from tf.data's prefetch buffer).
    Only JAX's CPU computations are affected. Nothing is changed if MEDJAX_TUNE_DISPATCH=0, if the
    allocator was not tuned that way, or if JAX's backend has started.
    """
    global dispatch_status
    if os.environ.get(DISPATCH_SWITCH, "1") == "0":
        dispatch_status = f"unchanged ({DISPATCH_SWITCH}=0)"
    elif not status.startswith("GLIBC_TUNABLES="):
        dispatch_status = "unchanged (the allocator's tunables are not set)"
    elif _jax_backend_started():
        dispatch_status = "unchanged (JAX's backend had already started)"
    else:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
        dispatch_status = "JAX runs CPU computations on the calling thread"
    return dispatch_status


def tune_process() -> str:
    """`tune_allocator()`, `tune_xla()`, then `tune_dispatch()`, for entry points, before JAX and
    TensorFlow start."""
    return f"allocator: {tune_allocator()}; XLA: {tune_xla()}; dispatch: {tune_dispatch()}"


def _jax_backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def _reexecute_with_tunables() -> None:
    """Replaces this process by the same command line with `TUNABLES` in GLIBC_TUNABLES."""
    if not sys.executable:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.environ[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
    except OSError:
        del os.environ["GLIBC_TUNABLES"], os.environ[_REEXEC_MARK]


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'unknown'."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unknown"


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else (0,)
    except (AttributeError, ValueError, OSError):
        return (0,)


def _libc_function(name: str, argtypes: tuple):
    """glibc's function `name` (returning int) through ctypes, or None where there is no such function."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def _apply() -> str:
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return "unchanged (no glibc mallopt)"
    applied = [name for name, (param, value) in SETTINGS.items() if mallopt(param, value) == 1]
    refused = [name for name in SETTINGS if name not in applied]
    return "glibc mallopt " + ", ".join(
        [f"{name}={SETTINGS[name][1]}" for name in applied] + [f"{name} refused" for name in refused]
    )


def release_free_memory() -> bool:
    """Hands the allocator's free memory back to the OS (glibc's malloc_trim), such as the hundreds of MiB
    that compiling a big program leaves free inside the heap, where they would otherwise stay resident
    (ResNet-18 7x7: 928 -> 532 MiB resident after compiling its train step; peak over the next steps
    1,392 -> 1,044 MiB). True if anything was released; a no-op off glibc or with MEDJAX_TUNE_MALLOC=0."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    malloc_trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    return malloc_trim is not None and malloc_trim(0) == 1
