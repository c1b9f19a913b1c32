"""Model zoo against PyTorch references, output for output.

Each torchvision architecture (AlexNet, VGG-11/16 with batch norm, GoogLeNet without auxiliary heads,
ResNet-18/34/50, DenseNet-121) is built by torchvision 0.28.0 with seeded random weights, converted by
medjax.convert's mapping and run by medjax on the same images: in eval mode (running statistics) the
logits, in train mode (batch statistics) the logits, the cross-entropy loss of one training step and the
updated batch-norm running statistics. The paper CNN, LeNet-5 and ZFNet are checked the same way against
the PyTorch definitions below. Dropout is 0 on both sides. EfficientNet-Lite0 is checked in
test_convert.py.

Needs the `convert` extra (torch, torchvision); skipped, saying so, without it.
"""

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from medjax import checkpointing, convert, models, transfer
from tests import torchvision_import

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[convert]')")
torchvision = torchvision_import.import_torchvision()

tnn = torch.nn
NUM_CLASSES = 6
BATCH = 4

# Tolerances (float32 on both sides). Each output sums products in another order than PyTorch's (up to
# 3*3*512 = 4,608 terms per conv output, 25,088 in VGG's first dense layer), so every layer adds a relative
# rounding difference of about 1e-6 (more with Winograd-transformed convolutions), carried through up to
# 121 layers; in train mode, batch statistics of the last stages (4 images of 2x2 maps) divide by small
# standard deviations and amplify it. Logits are compared relative to their largest magnitude: the
# largest difference seen is 4.7e-5 of it (ResNet-50, train mode; the others at most 2.4e-5), 2e-4
# leaves 4x headroom and is below what a wrong layer, order, wiring or setting gives (3e-4 for GoogLeNet's
# batch-norm epsilon 1e-5 instead of 1e-3, 1e-2 and more for the rest).
LOGITS_RTOL = 2e-4
LOSS_RTOL = 1e-4  # A smooth function of the logits, of order 1 (log 6 at random weights).
STATS_RTOL, STATS_ATOL = 1e-4, 1e-5  # Running mean and variance: one step of a moving average.


def _randomize_batch_norms(module: tnn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics (torchvision starts at 1, 0, 0, 1), so that a
    swapped scale/offset or mean/variance cannot pass unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, tnn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
                m.running_mean.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def _torch_reference(module: tnn.Module, x: np.ndarray, labels: np.ndarray) -> dict:
    """Eval logits, then train-mode logits, loss and the batch norms' running statistics after that
    forward pass (a state dict of running_mean and running_var), each running variance as flax keeps it.

    PyTorch moves running_var towards the unbiased batch variance (n / (n - 1) times the biased one, for n
    values per channel), flax towards the biased one; the expected flax value is computed from PyTorch's
    update and n, so that the comparison is exact up to rounding.
    """
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    norms = {name: m for name, m in module.named_modules() if isinstance(m, tnn.BatchNorm2d)}
    old_vars = {name: m.running_var.numpy().copy() for name, m in norms.items()}
    counts = {}  # Values per channel that each batch norm sees.
    hooks = [
        m.register_forward_hook(
            lambda m, inputs, out, name=name: counts.__setitem__(name, inputs[0].numel() / m.num_features)
        )
        for name, m in norms.items()
    ]
    with torch.no_grad():
        module.eval()
        eval_logits = module(xt).numpy()
        module.train()
        train_logits = module(xt)
        loss = tnn.functional.cross_entropy(train_logits, torch.from_numpy(labels).long())
    for hook in hooks:
        hook.remove()
    stats = {}
    for name, m in norms.items():
        n, momentum, old = counts[name], m.momentum, old_vars[name]
        unbiased = (m.running_var.numpy() - (1 - momentum) * old) / momentum
        stats[f"{name}.running_mean"] = m.running_mean.numpy().copy()
        stats[f"{name}.running_var"] = (1 - momentum) * old + momentum * unbiased * (n - 1) / n
    return {
        "eval_logits": eval_logits,
        "train_logits": train_logits.numpy(),
        "loss": float(loss),
        "running_stats": stats,
    }


def _medjax_outputs(model, variables: dict, x: np.ndarray, labels: np.ndarray) -> dict:
    """The same outputs from medjax, eval and train mode in one program."""

    def run(variables, x):
        eval_logits = model.apply(variables, x, train=False)
        train_logits, updates = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(train_logits, labels).mean()
        return eval_logits, train_logits, loss, updates.get("batch_stats", {})

    # One program per model, compiled for compile speed (it runs once): LLVM -O0.
    compiled = jax.jit(run).lower(variables, x).compile({"xla_backend_optimization_level": 0})
    eval_logits, train_logits, loss, batch_stats = compiled(variables, x)
    return {
        "eval_logits": np.asarray(eval_logits),
        "train_logits": np.asarray(train_logits),
        "loss": float(loss),
        "batch_stats": jax.tree_util.tree_map(np.asarray, batch_stats),
    }


def _assert_logits_close(actual, expected, what):
    scale = float(np.abs(expected).max())
    diff = float(np.abs(actual - expected).max())
    print(f"{what}: max abs diff {diff:.3g} at logit scale {scale:.3g}")
    assert diff <= LOGITS_RTOL * scale, f"{what}: max abs diff {diff:.3g} > {LOGITS_RTOL} * {scale:.3g}"


def _check_equivalence(model_config, reference: tnn.Module, rules, image_shape, seed=0):
    """Converts `reference`'s weights by `rules`, then compares every output of _torch_reference."""
    reference.eval()
    _randomize_batch_norms(reference, seed)
    state_dict = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    variables = convert.map_state_dict(state_dict, rules, model_config.name)
    model = models.create_model(model_config, NUM_CLASSES)
    checkpointing.check_structure(variables, transfer.abstract_variables(model, image_shape), "converted")

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, *image_shape)).astype(np.float32)
    labels = np.arange(BATCH, dtype=np.int32) % NUM_CLASSES
    expected = _torch_reference(reference, x, labels)
    actual = _medjax_outputs(model, variables, x, labels)

    name = model_config.name
    _assert_logits_close(actual["eval_logits"], expected["eval_logits"], f"{name} eval logits")
    _assert_logits_close(actual["train_logits"], expected["train_logits"], f"{name} train logits")
    assert actual["loss"] == pytest.approx(expected["loss"], rel=LOSS_RTOL), name
    expected_stats = traverse_util.flatten_dict(
        convert.map_state_dict(expected["running_stats"], rules, name)["batch_stats"]
    )
    actual_stats = traverse_util.flatten_dict(actual["batch_stats"])
    assert actual_stats.keys() == expected_stats.keys()
    for path, value in expected_stats.items():
        np.testing.assert_allclose(
            actual_stats[path], value, rtol=STATS_RTOL, atol=STATS_ATOL, err_msg="/".join(path)
        )


def _without_dropout(model_config):
    model_config = model_config.copy_and_resolve_references()
    if "dropout_rate" in model_config:
        model_config.dropout_rate = 0.0
    return model_config


# ----------------------------------------------------------------------------------------------------
# torchvision architectures, converted by medjax.convert's mapping.

TORCHVISION = {
    # medjax name: (torchvision constructor with dropout off, input [H, W, C]).
    "alexnet": (lambda: torchvision.models.alexnet(num_classes=NUM_CLASSES, dropout=0.0), (64, 64, 3)),
    "vgg11": (lambda: torchvision.models.vgg11_bn(num_classes=NUM_CLASSES, dropout=0.0), (32, 32, 3)),
    "vgg16": (lambda: torchvision.models.vgg16_bn(num_classes=NUM_CLASSES, dropout=0.0), (32, 32, 3)),
    "googlenet": (
        lambda: torchvision.models.googlenet(
            num_classes=NUM_CLASSES, aux_logits=False, init_weights=True, dropout=0.0
        ),
        (64, 64, 3),
    ),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES), (64, 64, 3)),
    "resnet34": (lambda: torchvision.models.resnet34(num_classes=NUM_CLASSES), (64, 64, 3)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=NUM_CLASSES), (64, 64, 3)),
    "densenet121": (
        lambda: torchvision.models.densenet121(num_classes=NUM_CLASSES, drop_rate=0),
        (64, 64, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_architecture_equals_reference(name):
    build, image_shape = TORCHVISION[name]
    torch.manual_seed(0)
    reference = build()
    config = _without_dropout(convert.model_config(name))
    _check_equivalence(config, reference, convert.MAPPINGS[name], image_shape)


# ----------------------------------------------------------------------------------------------------
# medjax's own architectures against PyTorch definitions written from their papers.


class PaperCNN(tnn.Module):
    """Four blocks of 3x3 conv (no bias, 'same' padding) -> batch norm -> ReLU -> 2x2 max-pool, then
    dropout -> dense 128 -> ReLU -> dropout -> dense."""

    def __init__(self, in_channels, num_classes, image_size, features=(16, 32, 64, 128), dense=128):
        super().__init__()
        self.blocks = tnn.ModuleList()
        for width in features:
            block = tnn.Module()
            block.conv = tnn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            block.bn = tnn.BatchNorm2d(width)
            self.blocks.append(block)
            in_channels = width
        side = image_size // 2 ** len(features)
        self.fc = tnn.Linear(in_channels * side * side, dense)
        self.head = tnn.Linear(dense, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = tnn.functional.max_pool2d(torch.relu(block.bn(block.conv(x))), 2)
        return self.head(torch.relu(self.fc(torch.flatten(x, 1))))


class LeNet5(tnn.Module):
    """LeNet-5 as medjax builds it: C1 6@5x5, 2x2 max-pool, C3 16@5x5, 2x2 max-pool, F5 120, F6 84,
    output; ReLU after every layer but the output."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 6, 5)
        self.conv2 = tnn.Conv2d(6, 16, 5)
        self.fc1 = tnn.Linear(16 * 5 * 5, 120)
        self.fc2 = tnn.Linear(120, 84)
        self.fc3 = tnn.Linear(84, num_classes)

    def forward(self, x):
        x = tnn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = tnn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(torch.relu(self.fc2(x)))


class ZFNet(tnn.Module):
    """ZFNet (Zeiler & Fergus, 2013, Fig. 3): 96 7x7/2, 256 5x5/2, 384 3x3, 384 3x3, 256 3x3 convs with
    3x3/2 max-pools after the 1st, 2nd (ceil mode, matching the figure's maps) and 5th; then, as
    torchvision's AlexNet, a 6x6 adaptive average pool and dropout-4096-dropout-4096-class layers."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, 96, 7, stride=2, padding=1)
        self.conv2 = tnn.Conv2d(96, 256, 5, stride=2)
        self.conv3 = tnn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = tnn.Conv2d(384, 384, 3, padding=1)
        self.conv5 = tnn.Conv2d(384, 256, 3, padding=1)
        self.fc6 = tnn.Linear(256 * 6 * 6, 4096)
        self.fc7 = tnn.Linear(4096, 4096)
        self.fc8 = tnn.Linear(4096, num_classes)

    def forward(self, x):
        pool = tnn.functional.max_pool2d
        x = pool(torch.relu(self.conv1(x)), 3, 2, ceil_mode=True)
        x = pool(torch.relu(self.conv2(x)), 3, 2, ceil_mode=True)
        x = torch.relu(self.conv4(torch.relu(self.conv3(x))))
        x = pool(torch.relu(self.conv5(x)), 3, 2)
        x = torch.flatten(tnn.functional.adaptive_avg_pool2d(x, 6), 1)
        return self.fc8(torch.relu(self.fc7(torch.relu(self.fc6(x)))))


def _zoo_config(name):
    from configs import paper_cnn, lenet5, zfnet  # The repository's configs (run from its root).

    return _without_dropout(
        {"paper_cnn": paper_cnn, "lenet5": lenet5, "zfnet": zfnet}[name].get_config().model
    )


def test_paper_cnn_equals_reference():
    config = _zoo_config("paper_cnn")
    torch.manual_seed(0)
    reference = PaperCNN(1, NUM_CLASSES, 64, tuple(config.features), config.dense_features)
    # The medjax module names of block i: 'block{i}/conv' and 'block{i}/bn' (conv-BN-pool blocks), or
    # 'conv{i}' and 'bn{i}' (layers directly in the model); read from the model's own variables.
    model = models.create_model(config, NUM_CLASSES)
    blocks = "block0" in transfer.abstract_variables(model, (64, 64, 1))["params"]
    rules = (
        convert.Rule(r"blocks\.(\d+)\.(conv|bn)", r"block\1/\2" if blocks else r"\2\1"),
        convert.Rule(r"fc", "fc", flatten=(config.features[-1], 4, 4)),
        convert.Rule(r"head", "head"),
    )
    _check_equivalence(config, reference, rules, (64, 64, 1))


def test_lenet5_equals_reference():
    torch.manual_seed(0)
    rules = (
        convert.Rule(r"conv(\d)", r"conv\1"),
        convert.Rule(r"fc1", "fc1", flatten=(16, 5, 5)),
        convert.Rule(r"fc(\d)", r"fc\1"),
    )
    _check_equivalence(_zoo_config("lenet5"), LeNet5(NUM_CLASSES), rules, (32, 32, 1))


def test_zfnet_equals_reference():
    torch.manual_seed(0)
    rules = (
        convert.Rule(r"conv(\d)", r"conv\1"),
        convert.Rule(r"fc6", "fc1", flatten=(256, 6, 6)),
        convert.Rule(r"fc7", "fc2"),
        convert.Rule(r"fc8", "head"),
    )
    _check_equivalence(_zoo_config("zfnet"), ZFNet(1, NUM_CLASSES), rules, (64, 64, 1))


def test_convert_writes_a_torchvision_checkpoint(tmp_path):
    """medjax.convert's whole path (what `python -m medjax.convert --model=googlenet --weights=FILE.pth`
    runs) for a torchvision architecture: 1000-class weights, checked against the model at 224x224."""
    torch.manual_seed(0)
    weights = str(tmp_path / "googlenet.pth")
    torch.save(torchvision.models.googlenet(aux_logits=False, init_weights=True).state_dict(), weights)
    metadata = convert.convert("googlenet", str(tmp_path / "converted"), weights)
    assert metadata["config"]["model"]["bn_epsilon"] == 1e-3  # torchvision's BasicConv2d.
    source = transfer.open_source(str(tmp_path / "converted"))
    assert (source.model_config.name, source.input_shape) == ("googlenet", (224, 224, 3))
    assert len(source.class_names) == 1000
