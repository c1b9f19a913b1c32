"""medjax.cpu's drop-ins against flax's layers (outputs, gradients, batch statistics, variables), its C++
kernels against XLA, their fallback and refusals, and medjax.ops' choice."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax import cpu, ops
from medjax.cpu import block, native
from medjax.models import paper_cnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(a, b, rtol=2e-5):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b)))
    )


def _value_and_grads(apply, variables, x, **kwargs):
    """Output, its gradient wrt params and input, and updated batch stats (one compiled call)."""

    def loss(params, x):
        out = apply({**variables, "params": params}, x, **kwargs)
        out, updates = out if isinstance(out, tuple) else (out, {})
        return jnp.sum(out * jnp.cos(out)), (out, updates)  # A cotangent that varies per element.

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (out, updates)), grads = jax.jit(fn)(variables["params"], x)
    return out, grads, updates


@pytest.mark.parametrize(
    "x_shape, kwargs, patches",
    [
        ((4, 16, 16, 1), dict(features=16, kernel_size=(3, 3)), False),
        ((4, 32, 32, 1), dict(features=16, kernel_size=(7, 7), strides=2, padding=3), False),  # ResNet stem.
        ((4, 2, 2, 16), dict(features=16, kernel_size=(3, 3), padding=1), True),  # Smaller than the kernel.
        ((4, 4, 4, 8), dict(features=8, kernel_size=(3, 3), strides=2, padding=1), True),  # Output 2x2.
        ((4, 8, 8, 4), dict(features=4, kernel_size=(3, 3), feature_group_count=2), False),  # XLA's.
    ],
)
def test_conv_equals_flax_conv(x_shape, kwargs, patches):
    x = jax.random.normal(jax.random.key(0), x_shape)
    ours, theirs = cpu.Conv(**kwargs), nn.Conv(**kwargs)
    variables = theirs.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    out, grads, _ = _value_and_grads(ours.apply, variables, x)
    ref_out, ref_grads, _ = _value_and_grads(theirs.apply, variables, x)
    _close(out, ref_out)
    jax.tree.map(_close, grads, ref_grads)
    text = jax.jit(lambda v: ours.apply(v, x)).lower(variables).as_text()
    assert ("convolution" not in text) == patches


def _reference_block(features):
    """The paper CNN's own plain-flax block, which the CPU block must reproduce."""
    return paper_cnn.ConvBlock(features)


@pytest.mark.parametrize(
    "cin, options, fused",
    [
        (1, block.BlockOptions(), True),  # The fused C++ first block.
        (8, block.BlockOptions(), False),  # Pool first.
        (1, block.BlockOptions(fused_block=False), False),
        (3, block.BlockOptions(pool_first=False), False),
    ],
)
def test_conv_block_equals_reference(cin, options, fused):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, cin))
    reference, ours = _reference_block(16), block.block_with(options)(16)
    variables = reference.init(jax.random.key(1), x, train=False)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x, train=False)) == jax.tree.map(
        jnp.shape, variables
    )
    # Negative scales on some channels: those pool the minimum before normalising.
    scale = variables["params"]["bn"]["scale"] * jnp.where(jnp.arange(16) % 3 == 0, -0.5, 1.5)
    variables = {
        **variables,
        "params": {**variables["params"], "bn": {**variables["params"]["bn"], "scale": scale}},
    }
    for train in (True, False):
        kwargs = dict(train=train, mutable=["batch_stats"] if train else False)
        out, grads, stats = _value_and_grads(ours.apply, variables, x, **kwargs)
        ref_out, ref_grads, ref_stats = _value_and_grads(reference.apply, variables, x, **kwargs)
        _close(out, ref_out)
        jax.tree.map(_close, grads, ref_grads)
        jax.tree.map(_close, stats, ref_stats)
    text = jax.jit(lambda v: ours.apply(v, x, train=True, mutable=["batch_stats"])).lower(variables).as_text()
    assert (native.BN_POOL_TARGET in text) == (fused and native.available())


@pytest.mark.parametrize(
    "shape, window, strides, padding",
    [((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 8, 8, 3), (2, 2), (2, 2), "VALID")],
)
def test_max_pool_equals_flax_including_ties(shape, window, strides, padding):
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2)  # Few values: many ties.
    g = jax.random.normal(jax.random.key(1), nn.max_pool(x, window, strides, padding).shape)
    grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x, window, strides, padding) * g)))(x)
    _close(cpu.max_pool(x, window, strides, padding), nn.max_pool(x, window, strides, padding))
    _close(grad(cpu.max_pool), grad(nn.max_pool))


def test_without_a_compiler_the_kernels_are_off_and_the_first_block_pools_first(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "status", "not loaded")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    assert not native.available()
    assert native.status.startswith("not built") and "no-such-compiler" in native.status
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    reference, ours = _reference_block(16), block.block_with(block.BlockOptions())(16)
    variables = reference.init(jax.random.key(1), x, train=False)
    kwargs = dict(train=True, mutable=["batch_stats"])
    out, grads, stats = _value_and_grads(ours.apply, variables, x, **kwargs)
    ref_out, ref_grads, ref_stats = _value_and_grads(reference.apply, variables, x, **kwargs)
    _close(out, ref_out)
    jax.tree.map(_close, grads, ref_grads)
    text = jax.jit(lambda v: ours.apply(v, x, **kwargs)).lower(variables).as_text()
    assert native.BN_POOL_TARGET not in text


def test_kernels_refuse_what_they_do_not_compute():
    with pytest.raises(ValueError, match="unsupported input"):
        native.conv_bn_pool(jnp.zeros((1, 7, 8, 1)), jnp.zeros((3, 3, 1, 16)), jnp.ones(16))  # Odd height.
    with pytest.raises(ValueError, match="Unknown config.cpu fields"):
        cpu.Options.from_config({"winograd": True})


def test_compiler_options_are_accepted_by_xla():
    for name in ("paper_cnn", "resnet18"):
        options = cpu.compiler_options(name)
        assert options
        jax.jit(lambda x: jnp.tanh(x) @ x).lower(jnp.ones((8, 8))).compile(options)


def test_ops_choice():
    config = ml_collections.ConfigDict({"ops": "auto", "cpu": {"max_pool": False}})
    assert ops.resolve(config, backend="gpu").name == "flax"
    chosen = ops.resolve(config, backend="cpu")
    assert chosen.name == "cpu" and not chosen.cpu_options.max_pool and chosen.cpu_options.fused_block
    assert "pieces off: max_pool" in chosen.describe()
    assert set(cpu.layer_overrides("resnet18", chosen.cpu_options)) == {"conv"}
    assert set(cpu.layer_overrides("resnet18")) == {"conv", "max_pool"}
    assert set(cpu.layer_overrides("paper_cnn")) == {"block"}
    config.ops = "jax"
    with pytest.raises(ValueError, match="config.ops='jax'"):
        ops.resolve(config)


_HEAP_AFTER_TUNING = """
import sys
from medjax import cpu
print(cpu.tune_process(cpu.Options(huge_pages=sys.argv[1] == "on")))
with open("/proc/self/smaps") as f:
    blocks = f.read().split("\\n")
heap = [i for i, line in enumerate(blocks) if line.rstrip().endswith("[heap]")]
print("heap THPeligible:", [next(l.split()[1] for l in blocks[i:] if l.startswith("THPeligible")) for i in heap])
"""


@pytest.mark.parametrize("huge_pages", ["on", "off"])
def test_tune_process_backs_the_heap_with_huge_pages_where_the_kernel_gives_them_on_request(huge_pages):
    run = subprocess.run(
        [sys.executable, "-c", _HEAP_AFTER_TUNING, huge_pages], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    said, eligible = run.stdout.splitlines()
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        on_request = "[madvise]" in f.read()
    if huge_pages == "off":
        assert said == "glibc mallopt set; no huge pages"
        assert eligible == "heap THPeligible: ['0']" or not on_request, run.stdout
    elif on_request:
        assert "MiB in transparent huge pages" in said and eligible == "heap THPeligible: ['1']", run.stdout
    else:
        assert "transparent huge pages as the system sets them" in said, run.stdout


_WITHOUT_CPU_PACKAGE = """
import sys
sys.modules["medjax.cpu"] = None  # Importing medjax.cpu now fails.
from absl import logging
from configs import quick
from medjax import evaluate, ops, train
config = quick.get_config()
config.ops = "flax"
config.data.manual_dir, config.data.tfds_dir = sys.argv[1], sys.argv[2] + "/tfds"
config.train.num_epochs, config.train.log_every_steps = 0.5, 1
print("process:", ops.tune_process(config))
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
train.train_and_evaluate(config, sys.argv[2] + "/run")
report = evaluate.evaluate_checkpoint(sys.argv[2] + "/run", split="test")
print("evaluated", report["num_examples"])
"""


def test_training_and_evaluation_run_without_medjax_cpu(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CPU_PACKAGE, os.path.join(REPO, "tests", "fixtures"), str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "evaluated 6" in run.stdout and "process: process settings unchanged" in run.stdout
    # One line per logged step (clu's logging writer would add "[1] train/loss=...").
    assert run.stderr.count("] step 1/2: ") == 1 and "train/loss" not in run.stderr, run.stderr[-3000:]
