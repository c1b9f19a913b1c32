"""Model registry, construction from config.model, layer-type fields, and what medjax.models imports."""

import ast
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import quick
from medjax import models
from medjax.models import paper_cnn

MODELS_DIR = os.path.dirname(os.path.abspath(models.__file__))


def _model_and_variables(dtype="float32"):
    config = quick.get_config()
    config.model.dtype = dtype
    model = models.create_model(config.model, num_classes=6)
    x = jnp.zeros((2, 64, 64, 1), jnp.uint8)
    return model, model.init(jax.random.key(0), x, train=False)


def test_output_shape_and_variables():
    model, variables = _model_and_variables()
    x = jax.random.uniform(jax.random.key(1), (3, 64, 64, 1))
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, 6) and logits.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"block0", "block1", "fc", "head"}
    assert variables["params"]["block0"]["conv"]["kernel"].shape == (3, 3, 1, 4)
    assert set(variables["params"]["block1"]["bn"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["block1"]["bn"]) == {"mean", "var"}
    assert variables["params"]["head"]["kernel"].shape[-1] == 6


def test_train_mode_uses_dropout_and_batch_statistics():
    model, variables = _model_and_variables()
    x = jax.random.uniform(jax.random.key(1), (8, 64, 64, 1))
    eval_a = model.apply(variables, x, train=False)
    eval_b = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
    )
    train_b, _ = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
    )
    assert not np.allclose(train_a, train_b)  # Different dropout masks.
    old_mean = variables["batch_stats"]["block0"]["bn"]["mean"]
    assert not np.allclose(updates["batch_stats"]["block0"]["bn"]["mean"], old_mean)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, variables = _model_and_variables("bfloat16")
    assert model.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
    logits = model.apply(variables, jnp.ones((2, 64, 64, 1)), train=False)
    assert logits.dtype == jnp.float32


def test_config_fields_become_constructor_fields():
    config = quick.get_config()
    model = models.create_model(config.model, 6)
    assert isinstance(model, paper_cnn.PaperCNN)
    assert (model.features, model.dense_features, model.num_classes) == ((4, 8), 16, 6)
    config.model.features = [4, 8]  # As read back from a checkpoint's JSON.
    assert models.create_model(config.model, 6).features == (4, 8)
    resnet = models.create_model(
        {"name": "resnet50", "stem": "small", "zero_init_residual": True, "dtype": "float32"}, 3
    )
    assert (resnet.stage_sizes, resnet.block_cls) == ((3, 4, 6, 3), models.Bottleneck)
    assert (resnet.stem, resnet.zero_init_residual) == ("small", True)


def test_unknown_names_fields_and_layers_are_errors():
    config = quick.get_config()
    config.model.name = "nope"
    with pytest.raises(ValueError, match="config.model.name='nope'"):
        models.create_model(config.model, 6)
    config = quick.get_config()
    config.model.dtype = "float8"
    with pytest.raises(ValueError, match="config.model.dtype='float8'"):
        models.create_model(config.model, 6)
    config = quick.get_config()
    config.model.stem = "small"  # A ResNet field, not the paper CNN's.
    with pytest.raises(ValueError, match="field.* stem for model 'paper_cnn'"):
        models.create_model(config.model, 6)
    # Fields that the registry entry fixes, and layer types, are not configuration.
    for field in ("stage_sizes", "conv"):
        with pytest.raises(ValueError, match=f"field.* {field} for model 'resnet18'"):
            models.create_model({"name": "resnet18", field: None}, 6)
    with pytest.raises(ValueError, match="'lenet5' has no layer field.* norm"):
        models.create_model({"name": "lenet5"}, 6, norm=nn.BatchNorm)


def _medjax_imports(source: str):
    """Absolute names of the medjax modules (or module attributes) that a file of medjax/models/ imports."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative to the file's package, medjax.models.
                package = ["medjax", "models"][: 3 - node.level]
                base = ".".join(package + ([base] if base else []))
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_import_walk_sees_absolute_and_relative_imports():
    source = (
        "import medjax.cpu\nfrom medjax import runtime\nfrom .. import native\nfrom .blocks import ConvBN\n"
    )
    assert list(_medjax_imports(source)) == [
        "medjax.cpu",
        "medjax.runtime",
        "medjax.native",
        "medjax.models.blocks.ConvBN",
    ]


def test_models_import_nothing_of_medjax_outside_models():
    files = sorted(name for name in os.listdir(MODELS_DIR) if name.endswith(".py"))
    assert "resnet.py" in files and "__init__.py" in files
    for name in files:
        with open(os.path.join(MODELS_DIR, name)) as f:
            imported = [m for m in _medjax_imports(f.read()) if m == "medjax" or m.startswith("medjax.")]
        outside = [m for m in imported if not m.startswith("medjax.models.")]
        assert not outside, f"medjax/models/{name} imports {outside}"
    for gone in ("layers", "normalization", "winograd"):
        assert f"{gone}.py" not in files


# ----------------------------------------------------------------------------------------------------
# Layer types passed as fields are the ones every layer of that kind uses.

CALLS = []


class RecordingConv(nn.Conv):
    def __call__(self, inputs):
        CALLS.append(("conv", self.path))
        return super().__call__(inputs)


class RecordingBatchNorm(nn.BatchNorm):
    def __call__(self, x, use_running_average=None):
        CALLS.append(("norm", self.path))
        return super().__call__(x, use_running_average)


class RecordingBlock(paper_cnn.ConvBlock):
    def __call__(self, x, *, train):
        CALLS.append(("block", self.path))
        return super().__call__(x, train=train)


def recording_max_pool(x, *args, **kwargs):
    CALLS.append(("max_pool", ()))
    return nn.max_pool(x, *args, **kwargs)


RECORDERS = {"conv": RecordingConv, "norm": RecordingBatchNorm, "block": RecordingBlock}
LAYERS = {
    "paper_cnn": ("block",),
    "lenet5": ("conv",),
    "alexnet": ("conv",),
    "zfnet": ("conv",),
    "vgg11": ("conv", "norm"),
    "vgg16": ("conv", "norm"),
    "googlenet": ("conv", "norm"),
    "resnet18": ("conv", "max_pool", "norm"),
    "resnet34": ("conv", "max_pool", "norm"),
    "resnet50": ("conv", "max_pool", "norm"),
    "densenet121": ("conv", "norm"),
    "efficientnet_lite0": ("conv", "norm"),
}


def test_every_model_has_its_layer_fields():
    assert {name: models.layer_fields(name) for name in models.MODELS} == LAYERS


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_fields_are_used_for_every_layer_of_their_kind(name):
    """Each conv kernel and batch norm of the model comes from the class passed as `conv` / `norm`, each
    paper-CNN block from `block`, and ResNet's stem pool is `max_pool` (abstract init, no compilation)."""
    layers = {kind: RECORDERS.get(kind, recording_max_pool) for kind in LAYERS[name]}
    model = models.create_model({"name": name}, 6, **layers)
    CALLS.clear()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False))
    recorded = {kind: {path for k, path in CALLS if k == kind} for kind in ("conv", "norm", "block")}
    params = traverse_util.flatten_dict(variables["params"])
    conv_paths = {path[:-1] for path, leaf in params.items() if path[-1] == "kernel" and leaf.ndim == 4}
    norm_paths = {path[:-1] for path in traverse_util.flatten_dict(variables.get("batch_stats", {}))}
    if "conv" in layers:
        assert conv_paths and recorded["conv"] == conv_paths
    if "norm" in layers:
        assert norm_paths and recorded["norm"] == norm_paths
    if "block" in layers:
        assert recorded["block"] == {(f"block{i}",) for i in range(len(model.features))}
    if "max_pool" in layers:
        assert sum(kind == "max_pool" for kind, _ in CALLS) == 1
