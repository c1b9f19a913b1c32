"""Everything that exists only to make XLA:CPU faster: drop-in layers, per-model compiler options and the
allocator setting. medjax runs without this package (config.ops='flax'); `medjax.ops` imports it only when
the CPU ops are chosen.

* `layer_overrides(model_name)`: the drop-ins a model gets, as keyword arguments of
  `models.create_model` (`conv`: `Conv`, nn.Conv with faster convolution passes; `block`: the paper
  CNN's `ConvBlock`, pool-first and the fused C++ first block; `max_pool`: ResNet's stem pool).
* `compiler_options(model_name)`: XLA:CPU options for `jax.jit` of the model's steps.
* `tune_process()`: glibc's allocator keeps freed memory for the next step (call before JAX starts).

Every piece can be switched off (`Options`, from `config.cpu`); benchmarks/cpu_ablation.py measures each.
"""

import ctypes
import ctypes.util
import os
import sys
from typing import NamedTuple

from medjax.cpu import native
from medjax.cpu.block import BlockOptions, ConvBlock, block_with
from medjax.cpu.conv import Conv, ConvOptions, conv_with
from medjax.cpu.pool import max_pool

__all__ = ["Conv", "ConvBlock", "Options", "compiler_options", "layer_overrides", "max_pool", "tune_process"]


class Options(NamedTuple):
    """The CPU pieces, each on by default (the fields of `config.cpu`)."""

    compiler_options: bool = True  # Per-model XLA:CPU options (`compiler_options`).
    malloc: bool = True  # glibc keeps freed memory for the next step (`tune_process`).
    huge_pages: bool = True  # With `malloc`: glibc's heap in transparent huge pages (`tune_process`).
    small_patches: bool = True  # Patches where the input or output is smaller than the kernel.
    max_pool: bool = True  # Max pool with a fused gradient (ResNet's stem).
    pool_first: bool = True  # Paper CNN blocks: pool before normalising.
    fused_block: bool = True  # Paper CNN's first block in one C++ pass.

    @classmethod
    def from_config(cls, config) -> "Options":
        """From `config.cpu` (a ConfigDict or mapping; missing fields keep their defaults)."""
        fields = dict(config or {})
        unknown = sorted(set(fields) - set(cls._fields))
        if unknown:
            raise ValueError(f"Unknown config.cpu fields {unknown}; known: {list(cls._fields)}")
        return cls(**{name: bool(value) for name, value in fields.items()})


def layer_overrides(model_name: str, options: Options = Options()) -> dict:
    """The drop-in layers for model `model_name`: keyword arguments of `models.create_model`."""
    conv_options = ConvOptions(**{name: getattr(options, name) for name in ConvOptions._fields})
    if model_name == "paper_cnn":
        return {"block": block_with(BlockOptions(options.fused_block, options.pool_first, conv_options))}
    overrides = {"conv": conv_with(conv_options)}
    if model_name.startswith("resnet") and options.max_pool:
        overrides["max_pool"] = max_pool
    return overrides


_YNN = "xla_cpu_experimental_ynn_fusion_type"


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def compiler_options(model_name: str, options: Options = Options()) -> dict:
    """XLA:CPU options for compiling model `model_name`'s train and eval steps.

    Convolutions go to XLA:CPU's own kernels instead of YNNPACK's, which ran small convolutions on one
    core; on AVX-512 CPUs XLA's fusions use 512-bit vectors. The paper CNN's fusions are compiled by the
    LLVM IR emitters and its matmuls are XLA's own too (YNNPACK keeps the reductions): both faster there,
    slower for ResNet-18.
    """
    if not options.compiler_options:
        return {}
    result = {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    if _has_avx512():
        result["xla_cpu_prefer_vector_width"] = 512
    if model_name == "paper_cnn":
        result.update({_YNN: "LIBRARY_FUSION_TYPE_REDUCE", "xla_cpu_use_fusion_emitters": False})
    return result


# mallopt parameters (glibc's malloc.h) -> value.
_MALLOPT = {
    -1: 2**31 - 1,  # M_TRIM_THRESHOLD: keep freed memory at the heap's top instead of unmapping it.
    -3: 2**30,  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap (not fresh mmap'd pages).
    -8: 1,  # M_ARENA_MAX: one arena, so blocks freed on XLA's threads serve the next step's.
}


def tune_process(options: Options = Options()) -> str:
    """Makes glibc's malloc keep XLA:CPU's big per-step buffers in one heap for the next step instead of
    returning them to the OS and faulting them in again, page by page, and backs that heap with
    transparent huge pages; returns what was done. Call it before JAX starts its threads. Does nothing
    off Linux/glibc or when `options.malloc` is off."""
    if not options.malloc:
        return "allocator unchanged (config.cpu.malloc=False)"
    if not sys.platform.startswith("linux"):
        return f"allocator unchanged (platform {sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator unchanged (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [param for param, value in _MALLOPT.items() if mallopt(param, value) != 1]
    if refused:
        return f"glibc mallopt set (refused: {refused})"
    return "glibc mallopt set; " + (_huge_page_heap(libc) if options.huge_pages else "no huge pages")


_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MADV_HUGEPAGE = 14


def _huge_page_heap(libc) -> str:
    """What glibc's `glibc.malloc.hugetlb=1` tunable does, without restarting the process: grows the heap
    once, to at most half the machine's memory and under the trim threshold (address space: a page costs
    memory only once it is touched), keeps it and marks it madvise(MADV_HUGEPAGE), so that XLA's large
    buffers are faulted in and addressed in 2 MiB pages. Only where the kernel gives huge pages on
    request."""
    try:
        with open(_THP_MODE) as f:
            mode = f.read().strip()
        with open("/proc/sys/vm/overcommit_memory") as f:
            strict = f.read().strip() == "2"
    except OSError:
        return "no transparent huge pages"
    if "[madvise]" not in mode:
        return f"transparent huge pages as the system sets them ({mode})"
    if strict:
        return "no huge-page heap (strict overcommit would charge its address space)"
    libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    chunk = _MALLOPT[-3] // 4  # Under the mmap threshold, so taken from the heap.
    # Freed back to the heap's top, the reserve must stay under the trim threshold to be kept.
    reserve = min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2, _MALLOPT[-1] - chunk)
    blocks = [libc.malloc(chunk) for _ in range(reserve // chunk)]
    for block in blocks:
        libc.free(block)
    with open("/proc/self/maps") as f:
        heap = [
            [int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith("[heap]")
        ]
    if not heap:
        return "no huge-page heap (no [heap] mapping)"
    start, end = heap[0][0], heap[-1][1]
    if libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        return f"no huge-page heap (madvise: {os.strerror(ctypes.get_errno())})"
    return f"heap of {(end - start) >> 20} MiB in transparent huge pages"


def status() -> str:
    """The C++ kernels' state, for logs."""
    native.available()
    return f"C++ kernels {native.status}"
