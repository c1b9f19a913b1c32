"""Model zoo: published parameter counts, shapes and dtypes, train/eval behaviour, a train step per family."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medjax import models
from medjax import steps
from medjax.models import blocks

ZOO = (
    "lenet5",
    "alexnet",
    "zfnet",
    "vgg11",
    "vgg16",
    "googlenet",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "efficientnet_lite0",
)
NUM_CLASSES = 6  # Medical MNIST.

# torchvision's counts at 224x224x3 with 1000 classes ('params' only: conv/dense weights and biases and
# batch-norm scales and offsets, not running statistics); vgg*_bn for VGG, googlenet(aux_logits=False).
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_868_840,
    "vgg16": 138_365_992,
    "googlenet": 6_624_904,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "efficientnet_lite0": 4_652_008,
    # ZFNet (arXiv:1311.2901, Fig. 3) with the same 6x6 pooled grid as AlexNet, weights + biases:
    #   conv1  7*7*3*96     + 96   =     14,208
    #   conv2  5*5*96*256   + 256  =    614,656
    #   conv3  3*3*256*384  + 384  =    885,120
    #   conv4  3*3*384*384  + 384  =  1,327,488
    #   conv5  3*3*384*256  + 256  =    884,992
    #   fc6    6*6*256*4096 + 4096 = 37,752,832
    #   fc7    4096*4096    + 4096 = 16,781,312
    #   fc8    4096*1000    + 1000 =  4,097,000
    #   total                      = 62,357,608
    "zfnet": 62_357_608,
}
LENET5_PARAMS = 61_706  # conv6 156 + conv16 2,416 + fc120 48,120 + fc84 10,164 + fc10 850 at 32x32x1.

# The smallest convenient input for the real train step (compilation, not compute, dominates); AlexNet
# and ZFNet need at least 63x63 for their three stride-2 max-pools.
STEP_IMAGE_SIZE = {"alexnet": 64, "zfnet": 64}
DEFAULT_STEP_IMAGE_SIZE = 32
# These tests run each program once, so they compile for compile speed: LLVM -O0 compiles the deep nets
# 1.5-2x faster (DenseNet-121's init + train step: 71 s at -O3, 42 s at -O0 on a loaded CPU). -O0 code
# is slow on big elementwise work, so the >60M-parameter models, whose init and Adam update touch every
# weight, get -O1 (VGG-16: 22 s at -O0, 10 s at -O1).
PARAM_HEAVY = {"alexnet", "zfnet", "vgg11", "vgg16"}


def _compile(fn, *args, name: str):
    """`jax.jit(fn)` compiled for `args` at the optimisation level above; returns the compiled callable."""
    options = {"xla_backend_optimization_level": 1 if name in PARAM_HEAVY else 0}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _config(name, **model_overrides):
    config = importlib.import_module(f"configs.{name}").get_config()
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


def _num_params(model, input_shape) -> int:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))


def test_registry_and_configs_cover_the_zoo():
    assert set(ZOO) <= set(models.MODELS)
    for name in ZOO:
        assert _config(name).model.name == name
    assert _config("paper").model.name == "paper_cnn"
    assert _config("paper_cnn").to_dict() == _config("base").to_dict()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    model = models.create_model(_config(name).model, 1000)
    assert _num_params(model, (1, 224, 224, 3)) == PUBLISHED_PARAMS[name]


def test_lenet5_parameter_count_at_its_native_input():
    model = models.create_model(_config("lenet5").model, 10)
    assert _num_params(model, (1, 32, 32, 1)) == LENET5_PARAMS


def test_resnet_stems():
    imagenet = models.create_model(_config("resnet18", stem="imagenet").model, 1000)
    small = models.create_model(_config("resnet18", stem="small").model, 1000)
    # Only the stem kernel differs: 7x7x3x64 vs 3x3x3x64.
    assert _num_params(imagenet, (1, 224, 224, 3)) - _num_params(small, (1, 224, 224, 3)) == (49 - 9) * 3 * 64
    with pytest.raises(ValueError, match="stem='tiny'"):
        _num_params(models.create_model(_config("resnet18", stem="tiny").model, 6), (1, 64, 64, 1))


@pytest.mark.parametrize("name", ZOO)
def test_output_shapes(name):
    """Abstract evaluation only (no compilation): 64x64x1 Medical MNIST input, 6 classes, both modes."""
    model = models.create_model(_config(name).model, NUM_CLASSES)
    x = jax.ShapeDtypeStruct((3, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert (logits.shape, logits.dtype) == ((3, NUM_CLASSES), jnp.float32)
    train_logits, updates = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
        ),
        variables,
        x,
    )
    assert (train_logits.shape, train_logits.dtype) == ((3, NUM_CLASSES), jnp.float32)
    assert jax.tree_util.tree_structure(updates.get("batch_stats", {})) == jax.tree_util.tree_structure(
        variables.get("batch_stats", {})
    )


@pytest.mark.parametrize("name", ZOO)
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    model = models.create_model(_config(name, dtype="bfloat16").model, NUM_CLASSES)
    x = jnp.zeros((2, 64, 64, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert [a.dtype for a in jaxpr.out_avals] == [jnp.float32]
    # Every conv and matmul runs in bfloat16: its output variable is typed bf16.
    outputs = [
        line.split("=")[0]
        for line in str(jaxpr).splitlines()
        if re.search(r"= (conv_general_dilated|dot_general)\[", line)
    ]
    assert outputs and all(":bf16[" in out for out in outputs), outputs


TRAIN_MODE = ("alexnet", "resnet18", "efficientnet_lite0")  # Dropout only, batch norm only, both.
# One train-step program per building block: ZFNet shares AlexNet's module, VGG-16 VGG-11's, ResNet-34
# ResNet-18's (BasicBlock). GoogLeNet, ResNet-50 and DenseNet-121 (the slowest to compile) are checked
# against PyTorch in eval and train mode by test_reference.py instead.
TRAIN_STEP = ("lenet5", "alexnet", "vgg11", "resnet18", "efficientnet_lite0")


@pytest.fixture(scope="module")
def stepped():
    """name -> {dropout key: outputs} of one compiled program per model: init and one real optimizer step
    of the model's own config (warmup off); for the models of TRAIN_MODE also eval and train-mode logits,
    and a second run with another dropout key."""
    cache = {}

    def run(name):
        if name not in cache:
            cache[name] = _init_and_step(name)
        return cache[name]

    return run


def _init_and_step(name):
    config = _config(name)
    config.train.warmup_steps = 0  # A warmup would make the first learning rate 0.
    size = STEP_IMAGE_SIZE.get(name, DEFAULT_STEP_IMAGE_SIZE)
    model = models.create_model(config.model, NUM_CLASSES)
    tx = steps.create_optimizer(config.train, total_steps=10)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (2, size, size, 1)).astype(np.uint8),
        "label": np.array([0, 5], np.int32),
    }
    step_kwargs = dict(
        model=model,
        tx=tx,
        mean=config.data.mean,
        std=config.data.std,
        label_smoothing=config.train.label_smoothing,
    )

    def init_and_step(key, dropout_key, batch):
        state = steps.init_state(model, tx, key, image_shape=(size, size, 1))
        new_state, metrics = steps.train_step(state, batch, dropout_key=dropout_key, **step_kwargs)
        changed = jax.tree_util.tree_map(lambda a, b: jnp.any(a != b), state.params, new_state.params)
        outputs = {
            "loss": metrics["loss"],
            "changed": jnp.stack(jax.tree_util.tree_leaves(changed)),
            "step": new_state.step,
            "batch_stats": state.batch_stats,
            "new_batch_stats": new_state.batch_stats,
        }
        if name in TRAIN_MODE:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            x = steps.preprocess(batch["image"], mean=config.data.mean, std=config.data.std)
            outputs["eval_logits"] = model.apply(variables, x, train=False)
            outputs["train_logits"], _ = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
        return outputs

    key = jax.random.key(0)
    compiled = _compile(init_and_step, key, key, batch, name=name)
    return {k: compiled(key, jax.random.key(k), batch) for k in ((2, 3) if name in TRAIN_MODE else (2,))}


@pytest.mark.parametrize("name", TRAIN_MODE)
def test_train_mode_uses_dropout_and_batch_statistics(name, stepped):
    a, b = stepped(name)[2], stepped(name)[3]
    model = models.create_model(_config(name).model, NUM_CLASSES)
    has_dropout = getattr(model, "dropout_rate", 0.0) > 0
    has_bn = bool(a["batch_stats"])
    assert has_dropout or has_bn
    np.testing.assert_array_equal(a["eval_logits"], b["eval_logits"])
    assert not np.allclose(a["train_logits"], a["eval_logits"])
    # Different dropout masks give different logits.
    assert np.allclose(a["train_logits"], b["train_logits"]) != has_dropout
    if has_bn:
        # Every batch norm moves its running mean or variance (the mean alone can stay ~0: a bias-free
        # linear map of a batch-normalised input has a ~0 batch mean).
        old = traverse_util.flatten_dict(a["batch_stats"])
        new = traverse_util.flatten_dict(a["new_batch_stats"])
        moved = {path[:-1] for path in old if not np.allclose(old[path], new[path])}
        assert moved == {path[:-1] for path in old}


@pytest.mark.parametrize("name", TRAIN_STEP)
def test_one_train_step(name, stepped):
    """Init and one real optimizer step of the model's own config: a finite loss, every parameter moves."""
    outputs = stepped(name)[2]
    assert np.isfinite(outputs["loss"]) and int(outputs["step"]) == 1
    changed = np.asarray(outputs["changed"])
    assert np.all(changed), f"{int((~changed).sum())} parameter arrays did not move"


def test_padding_and_pooling_follow_tensorflow_and_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    # TensorFlow 'SAME': output ceil(n / s); the odd pixel of padding goes at the end.
    assert blocks.tf_same_padding((64, 63), 3, 2) == ((0, 1), (1, 1))
    assert blocks.tf_same_padding((28, 28), 5, 2) == ((1, 2), (1, 2))
    assert blocks.tf_same_padding((7, 7), 1, 1) == ((0, 0), (0, 0))

    def to_nhwc(t):
        return t.permute(0, 2, 3, 1).numpy()

    rng = np.random.default_rng(0)
    for h, w in [(13, 13), (26, 27), (2, 2), (1, 1)]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        for size in (1, 6, 7):
            np.testing.assert_allclose(
                blocks.adaptive_avg_pool(jnp.asarray(x), size),
                to_nhwc(F.adaptive_avg_pool2d(xt, size)),
                rtol=1e-5,
                atol=1e-6,
            )
        for window, stride, padding in [(3, 2, 0), (2, 2, 0), (3, 1, 1)]:
            if min(h, w) + 2 * padding < window:
                continue
            np.testing.assert_array_equal(
                blocks.max_pool_ceil(jnp.asarray(x), window, stride, padding),
                to_nhwc(F.max_pool2d(xt, window, stride, padding, ceil_mode=True)),
            )
