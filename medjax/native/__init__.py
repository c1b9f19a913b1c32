"""medjax's C++ kernels for XLA:CPU, called through XLA's FFI.

- `conv_kernel_grad` computes a convolution's kernel gradient straight from the padded input and the
  output cotangent (`kernel_grad.cc`), without building patches.
- `conv_bn_pool` and `conv_bn_pool_kernel_grad` fuse a first block, a stride-1 convolution with few
  input channels, its batch-norm moments and a 2x2 max pool, into one pass over the images forward and
  one backward (`conv_bn_pool.cc`), never storing the full-size convolution output or its gradient.

They are compiled together on first use with the machine's C++ compiler for the machine's CPU
(`-march=native`) into one library in a cache directory (MEDJAX_NATIVE_CACHE, default
~/.cache/medjax/native), keyed by the sources, jaxlib's version and the CPU, and registered as FFI
targets. Where that fails (no compiler, no writable cache, another platform), `available()` is False,
says why in `status`, and medjax's layers keep their pure-JAX methods.
MEDJAX_NATIVE=0 turns the kernels off.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import jax
import jaxlib
import jax.numpy as jnp
from jax import lax

ENV_SWITCH = "MEDJAX_NATIVE"
CACHE_ENV = "MEDJAX_NATIVE_CACHE"
TARGET = "medjax_conv_kernel_grad"
BN_POOL_TARGET = "medjax_conv_bn_pool"
BN_POOL_GRAD_TARGET = "medjax_conv_bn_pool_kernel_grad"
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("kernel_grad.cc", "conv_bn_pool.cc")
_HEADERS = ("parts.h",)
# Output channels are taken 16 (one 512-bit vector of float32) at a time.
COUT_MULTIPLE = 16

status = "not loaded"
_loaded: Optional[bool] = None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (the library is built for this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _library_path() -> str:
    source = b""
    for name in _SOURCES + _HEADERS:
        with open(os.path.join(_DIR, name), "rb") as f:
            source += f.read()
    key = hashlib.sha256(
        source + jaxlib.__version__.encode() + platform.machine().encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "medjax", "native")
    return os.path.join(cache, f"medjax_native_{key}.so")


def _compile(path: str) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built under a temporary name and renamed, so that concurrent processes never load a partial file.
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
    """Whether the kernels are built and registered (builds them on the first call)."""
    global _loaded, status
    if _loaded is not None:
        return _loaded
    _loaded = False
    if os.environ.get(ENV_SWITCH, "1") == "0":
        status = f"off ({ENV_SWITCH}=0)"
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        status = f"not built (platform {platform.system()} {platform.machine()})"
        return False
    try:
        path = _library_path()
        if not os.path.exists(path):
            _compile(path)
        library = ctypes.CDLL(path)
        for target, symbol in (
            (TARGET, library.MedjaxConvKernelGrad),
            (BN_POOL_TARGET, library.MedjaxConvBnPool),
            (BN_POOL_GRAD_TARGET, library.MedjaxConvBnPoolKernelGrad),
        ):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        status = f"not built ({error})"
        return False
    _loaded = True
    status = f"loaded from {path}"
    return True


def supports(kernel_shape, dtype) -> bool:
    """Whether `conv_kernel_grad` takes this kernel shape and dtype."""
    return jnp.dtype(dtype) == jnp.float32 and kernel_shape[3] % COUT_MULTIPLE == 0


def _padded(x, pads):
    """NHWC x zero-padded by ((top, bottom), (left, right)); negative pads crop."""
    (top, bottom), (left, right) = pads
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def conv_kernel_grad(x, g, kernel_shape, strides, pads) -> jnp.ndarray:
    """Kernel cotangent [kh, kw, cin, cout] of a 2-D NHWC/HWIO float32 convolution of x [n, h, w, cin]
    with `strides` and explicit `pads`, given its output cotangent g [n, oh, ow, cout] (XLA:CPU only;
    check `available()` and `supports()` first)."""
    kh, kw, cin, cout = kernel_shape
    if not supports(kernel_shape, x.dtype) or g.dtype != jnp.float32:
        raise ValueError(f"conv_kernel_grad: unsupported kernel {kernel_shape} or dtypes {x.dtype}/{g.dtype}")
    dk = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((kh * kw * cin, cout), jnp.float32))(
        _padded(x, pads), g, kh=kh, kw=kw, sh=strides[0], sw=strides[1]
    )
    return dk.reshape(kernel_shape)


# The kernels and input channels that `conv_bn_pool` is compiled for: 3x3 on grayscale or RGB images.
BN_POOL_KERNEL_SIZE = (3, 3)
BN_POOL_INPUT_CHANNELS = (1, 3)


def supports_conv_bn_pool(x_shape, kernel_shape, dtype) -> bool:
    """Whether `conv_bn_pool` takes this NHWC input shape, HWIO kernel shape and dtype."""
    kh, kw, cin, cout = kernel_shape
    _, h, w, x_cin = x_shape
    return (
        jnp.dtype(dtype) == jnp.float32
        and x_cin == cin
        and (kh, kw) == BN_POOL_KERNEL_SIZE
        and cin in BN_POOL_INPUT_CHANNELS
        and cout % COUT_MULTIPLE == 0
        and h >= 2
        and w >= 2
        and h % 2 == 0
        and w % 2 == 0
    )


def _same_padded(x, kernel_shape):
    kh, kw = kernel_shape[:2]
    return _padded(x, (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)))


def _check_conv_bn_pool(x, kernel, name):
    if not supports_conv_bn_pool(x.shape, kernel.shape, x.dtype) or kernel.dtype != jnp.float32:
        raise ValueError(
            f"{name}: unsupported input {x.shape} {x.dtype} or kernel {kernel.shape} {kernel.dtype}"
        )


def conv_bn_pool(x, kernel, sign):
    """For y = conv(x, kernel) (NHWC/HWIO float32, stride 1, 'SAME' padding), never materialised: the
    2x2/2 max pool of sign * y times sign (sign [cout] of +1/-1: -1 channels pool the minimum), and the
    mean and mean square of y per channel. Returns (pooled [n, h/2, w/2, cout], moments [2, cout]).
    XLA:CPU only; check `available()` and `supports_conv_bn_pool()` first."""
    _check_conv_bn_pool(x, kernel, "conv_bn_pool")
    n, h, w, _ = x.shape
    kh, kw, cin, cout = kernel.shape
    shapes = (
        jax.ShapeDtypeStruct((n, h // 2, w // 2, cout), jnp.float32),
        jax.ShapeDtypeStruct((2, cout), jnp.float32),
    )
    return jax.ffi.ffi_call(BN_POOL_TARGET, shapes)(
        _same_padded(x, kernel.shape), kernel.reshape(kh * kw * cin, cout), sign, kh=kh, kw=kw
    )


def conv_bn_pool_kernel_grad(x, kernel, sign, pooled_cotangent, alpha, beta):
    """The kernel cotangent [kh, kw, cin, cout] through `conv_bn_pool`: the convolution output's cotangent
    is alpha + beta * conv(x) plus pooled_cotangent at the first element of each window that equals the
    pooled value (alpha, beta [cout]: the moments' cotangents times 1 / (n h w) and 2 / (n h w))."""
    _check_conv_bn_pool(x, kernel, "conv_bn_pool_kernel_grad")
    kh, kw, cin, cout = kernel.shape
    dk = jax.ffi.ffi_call(BN_POOL_GRAD_TARGET, jax.ShapeDtypeStruct((kh * kw * cin, cout), jnp.float32))(
        _same_padded(x, kernel.shape),
        kernel.reshape(kh * kw * cin, cout),
        sign,
        pooled_cotangent,
        alpha,
        beta,
        kh=kh,
        kw=kw,
    )
    return dk.reshape(kernel.shape)
