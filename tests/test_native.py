"""medjax.native: the fused C++ kernel gradient against XLA's, its build and its fallback."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medjax import native
from medjax.models import layers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++")) or bool(os.environ.get("CXX"))
# Where no compiler exists, test_built_wherever_a_compiler_is_found checks the fallback instead.
needs_kernel = pytest.mark.skipif(
    not _HAS_COMPILER, reason="no C++ compiler: the fused kernel cannot be built"
)


def _require_kernel():
    if not native.available():
        pytest.fail(f"a C++ compiler is present but the fused kernel is not built: {native.status}")


def _xla_kernel_grad(x, g, kernel_shape, strides, pads):
    kernel = jnp.zeros(kernel_shape, jnp.float32)
    conv = lambda k: lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST
    )
    return jax.vjp(conv, kernel)[1](g)[0]


def test_built_wherever_a_compiler_is_found():
    if _HAS_COMPILER:
        assert native.available(), native.status
        assert native.status.startswith("loaded from ")
    else:
        assert not native.available()
        assert "compiler" in native.status


@pytest.mark.parametrize(
    "x_shape,kernel_shape,strides,pads",
    [
        ((3, 12, 12, 1), (3, 3, 1, 16), (1, 1), ((1, 1), (1, 1))),  # Odd batch: uneven parts.
        ((2, 10, 9, 16), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1))),
        ((2, 13, 12, 1), (7, 7, 1, 64), (2, 2), ((3, 2), (3, 3))),  # ResNet's stem, uneven pads.
        ((4, 9, 11, 3), (5, 3, 3, 48), (2, 1), ((0, 2), (1, 0))),  # 48 = 32 + 16 output channels.
        ((1, 6, 6, 20), (3, 3, 20, 16), (1, 1), ((0, 0), (0, 0))),  # VALID; 20 rows: a partial block.
        ((2, 9, 8, 2), (3, 3, 2, 16), (1, 1), ((-1, 1), (2, -1))),  # Negative pads crop.
    ],
)
@needs_kernel
def test_kernel_grad_matches_xla(x_shape, kernel_shape, strides, pads):
    _require_kernel()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    out = jax.eval_shape(
        lambda: lax.conv_general_dilated(
            x, jnp.zeros(kernel_shape), strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    g = jnp.asarray(rng.standard_normal(out.shape, np.float32))
    fused = jax.jit(lambda x, g: native.conv_kernel_grad(x, g, kernel_shape, strides, pads))(x, g)
    expected = _xla_kernel_grad(x, g, kernel_shape, strides, pads)
    assert fused.shape == kernel_shape and fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, expected, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(expected))))


def test_unsupported_shapes_and_dtypes_are_refused():
    x = jnp.zeros((1, 8, 8, 2))
    assert not native.supports((3, 3, 2, 24), jnp.float32)  # Not a multiple of 16 output channels.
    assert not native.supports((3, 3, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\(3, 3, 2, 24\)"):
        native.conv_kernel_grad(x, jnp.zeros((1, 8, 8, 24)), (3, 3, 2, 24), (1, 1), ((1, 1), (1, 1)))


@needs_kernel
def test_the_kernel_itself_refuses_mismatched_shapes():
    _require_kernel()
    call = jax.ffi.ffi_call(native.TARGET, jax.ShapeDtypeStruct((9, 16), jnp.float32))
    with pytest.raises(Exception, match="padded input 6x6 too small for a 8x8 output"):
        call(jnp.zeros((1, 6, 6, 1)), jnp.zeros((1, 8, 8, 16)), kh=3, kw=3, sh=1, sw=1).block_until_ready()


@needs_kernel
def test_layer_gradient_with_and_without_the_fused_kernel():
    """The paper CNN's second convolution: fused where built; the same gradient as XLA's own layer."""
    _require_kernel()
    shapes = ((4, 16, 16, 16), (3, 3, 16, 32), (1, 1), ((1, 1), (1, 1)))
    assert layers.conv_plan(*shapes[:3], shapes[3]).kernel_grad == "fused"
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shapes[0], np.float32))
    kernel = jnp.asarray(rng.standard_normal(shapes[1], np.float32))
    loss = lambda conv: lambda k: jnp.sum(jnp.sin(conv(x, k)))
    fast = lambda x, k: layers.fast_conv(x, k, (1, 1), ((1, 1), (1, 1)))
    xla = lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    got, want = jax.grad(loss(fast))(kernel), jax.grad(loss(xla))(kernel)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def _fresh_process(env_overrides: dict) -> str:
    """native.available() and the chosen kernel-gradient method in a new process."""
    code = (
        "from medjax import native; from medjax.models import layers; "
        "print(native.available(), layers.conv_plan((8, 16, 16, 16), (3, 3, 16, 32), (1, 1), "
        "((1, 1), (1, 1))).kernel_grad); print(native.status)"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_overrides)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=_REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_switched_off_falls_back_to_patches():
    out = _fresh_process({native.ENV_SWITCH: "0"})
    assert out.splitlines()[0] == "False patches"
    assert f"{native.ENV_SWITCH}=0" in out


def test_failed_build_falls_back_to_patches_and_says_why(tmp_path):
    out = _fresh_process({"CXX": "/bin/false", native.CACHE_ENV: str(tmp_path)})
    assert out.splitlines()[0] == "False patches"
    assert "/bin/false" in out and "failed" in out
    assert os.listdir(tmp_path) == []  # No partial library left behind.
