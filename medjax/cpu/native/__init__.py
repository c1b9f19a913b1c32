"""C++ kernels for XLA:CPU, called through XLA's FFI.

`conv_bn_pool` / `conv_bn_pool_kernel_grad`: a first block (stride-1 convolution on few input channels,
its batch-norm moments and a 2x2 max pool) in one pass over the images forward and one backward
(`conv_bn_pool.cc`); the full-size convolution output and its gradient are never stored.

They are compiled on first use with the machine's C++ compiler (CXX, else c++/g++/clang++) for
the machine's CPU into one library cached under MEDJAX_NATIVE_CACHE (default ~/.cache/medjax/native),
keyed by the sources, jaxlib's version and the CPU. Where that fails, `available()` is False, `status` says
why, and the callers keep their XLA methods.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

CACHE_ENV = "MEDJAX_NATIVE_CACHE"
BN_POOL_TARGET = "medjax_conv_bn_pool"
BN_POOL_GRAD_TARGET = "medjax_conv_bn_pool_kernel_grad"
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("conv_bn_pool.cc",)
COUT_MULTIPLE = 16  # Output channels are taken 16 (one 512-bit vector of float32) at a time.

status = "not loaded"
_loaded = None


def _library_path() -> str:
    digest = hashlib.sha256(jaxlib.__version__.encode() + platform.machine().encode())
    for name in _SOURCES + ("parts.h",):
        with open(os.path.join(_DIR, name), "rb") as f:
            digest.update(f.read())
    try:  # The library is built for this CPU (-march=native).
        with open("/proc/cpuinfo") as f:
            digest.update("".join(sorted({l for l in f if l.startswith(("model name", "flags"))})).encode())
    except OSError:
        digest.update(platform.processor().encode())
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "medjax", "native")
    return os.path.join(cache, f"medjax_native_{digest.hexdigest()[:16]}.so")


def _compile(path: str) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    command += ["-I", jax.ffi.include_dir(), *(os.path.join(_DIR, name) for name in _SOURCES), "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def available() -> bool:
    """Whether the kernels are built and registered with XLA:CPU (builds them on the first call)."""
    global _loaded, status
    if _loaded is None:
        _loaded = False
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
            status = f"not built (platform {platform.system()} {platform.machine()})"
            return False
        try:
            path = _library_path()
            if not os.path.exists(path):
                _compile(path)
            library = ctypes.CDLL(path)
            for target, symbol in (
                (BN_POOL_TARGET, library.MedjaxConvBnPool),
                (BN_POOL_GRAD_TARGET, library.MedjaxConvBnPoolKernelGrad),
            ):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        except (OSError, RuntimeError, AttributeError) as error:
            status = f"not built ({error})"
            return False
        _loaded, status = True, f"loaded from {path}"
    return _loaded


def supports_conv_bn_pool(x_shape, kernel_shape, dtype) -> bool:
    """Whether `conv_bn_pool` takes this NHWC input, HWIO kernel and dtype: 3x3 on 1 or 3 channels."""
    (_, h, w, x_cin), (kh, kw, cin, cout) = x_shape, kernel_shape
    return (
        jnp.dtype(dtype) == jnp.float32
        and x_cin == cin in (1, 3)
        and (kh, kw) == (3, 3)
        and cout % COUT_MULTIPLE == 0
        and h >= 2
        and w >= 2
        and h % 2 == w % 2 == 0
    )


def _padded(x, pads):
    """NHWC x zero-padded by ((top, bottom), (left, right))."""
    (top, bottom), (left, right) = pads
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _check_conv_bn_pool(x, kernel, name):
    if not supports_conv_bn_pool(x.shape, kernel.shape, x.dtype) or kernel.dtype != jnp.float32:
        raise ValueError(
            f"{name}: unsupported input {x.shape} {x.dtype} or kernel {kernel.shape} {kernel.dtype}"
        )
    return _padded(x, ((1, 1), (1, 1))), kernel.reshape(-1, kernel.shape[3])


def conv_bn_pool(x, kernel, sign):
    """For y = conv(x, kernel) (float32 NHWC/HWIO, 3x3, stride 1, 'SAME'), never stored: the 2x2/2 max
    pool of sign * y times sign (sign [cout] of +-1: -1 channels pool the minimum) and y's per-channel
    mean and mean square. Returns (pooled [n, h/2, w/2, cout], moments [2, cout])."""
    xp, k = _check_conv_bn_pool(x, kernel, "conv_bn_pool")
    n, h, w, _ = x.shape
    cout = kernel.shape[3]
    shapes = (
        jax.ShapeDtypeStruct((n, h // 2, w // 2, cout), jnp.float32),
        jax.ShapeDtypeStruct((2, cout), jnp.float32),
    )
    return jax.ffi.ffi_call(BN_POOL_TARGET, shapes)(xp, k, sign, kh=3, kw=3)


def conv_bn_pool_kernel_grad(x, kernel, sign, pooled_cotangent, alpha, beta):
    """The kernel cotangent through `conv_bn_pool`: the convolution output's cotangent is alpha + beta *
    conv(x), plus pooled_cotangent at the first element of each window equal to the pooled value (alpha,
    beta [cout]: the moments' cotangents times 1 / (n h w) and 2 / (n h w))."""
    xp, k = _check_conv_bn_pool(x, kernel, "conv_bn_pool_kernel_grad")
    shape = jax.ShapeDtypeStruct(k.shape, jnp.float32)
    dk = jax.ffi.ffi_call(BN_POOL_GRAD_TARGET, shape)(xp, k, sign, pooled_cotangent, alpha, beta, kh=3, kw=3)
    return dk.reshape(kernel.shape)
