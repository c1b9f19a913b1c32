"""MedMNIST TFDS builders: small .npz files made here, and the real files when MEDJAX_MANUAL_DIR has them."""

import os

import numpy as np
import pytest

from medjax import datasets
from medjax.datasets import medmnist

SPLITS = ("train", "validation", "test")
SIZES = {"train": 12, "val": 4, "test": 6}


def write_npz(path, channels=1, num_classes=2, sizes=SIZES, seed=0, **overrides):
    """A MedMNIST-layout .npz: {split}_images uint8 [N, 28, 28(, 3)], {split}_labels uint8 [N, 1]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        shape = (n, 28, 28) if channels == 1 else (n, 28, 28, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8)[:, None]
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_registered_names():
    for name in ("medical_mnist", "pneumoniamnist", "breastmnist", "retinamnist", "pathmnist"):
        assert name in datasets.BUILDERS
    assert datasets.BUILDERS["pneumoniamnist"] is medmnist.PneumoniaMnist
    assert medmnist.PneumoniaMnist.name == "pneumoniamnist"


def test_builder_on_a_small_npz(tmp_path):
    arrays = write_npz(str(tmp_path / "manual" / "medmnist" / "pneumoniamnist.npz"))
    builder = datasets.prepare("pneumoniamnist", str(tmp_path / "tfds"), str(tmp_path / "manual"))
    info = builder.info
    assert set(info.features) == {"image", "label", "index"}
    assert info.features["image"].shape == (28, 28, 1)
    assert info.features["label"].names == ["normal", "pneumonia"]
    assert {s: info.splits[s].num_examples for s in SPLITS} == {"train": 12, "validation": 4, "test": 6}
    assert info.metadata["official_md5"] is False
    for split, npz_split in zip(SPLITS, ("train", "val", "test")):
        data = datasets.load_split(builder, split)
        np.testing.assert_array_equal(data["index"], np.arange(SIZES[npz_split]))
        np.testing.assert_array_equal(data["image"][..., 0], arrays[f"{npz_split}_images"])
        np.testing.assert_array_equal(data["label"], arrays[f"{npz_split}_labels"][:, 0])
        assert data["label"].dtype == np.int32 and data["image"].dtype == np.uint8


def test_rgb_builder_and_flat_manual_dir(tmp_path):
    write_npz(str(tmp_path / "manual" / "retinamnist.npz"), channels=3, num_classes=5)
    builder = datasets.prepare("retinamnist", str(tmp_path / "tfds"), str(tmp_path / "manual"))
    data = datasets.load_split(builder, "train")
    assert data["image"].shape == (12, 28, 28, 3)
    assert builder.info.features["label"].names == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"val_labels": None}, r"lacks keys \['val_labels'\]"),
        ({"test_images": np.zeros((6, 32, 32), np.uint8)}, r"test_images is uint8 \(6, 32, 32\)"),
        ({"test_images": np.zeros((6, 28, 28), np.float32)}, "test_images is float32"),
        ({"train_labels": np.zeros((12, 14), np.uint8)}, r"train_labels is uint8 \(12, 14\)"),
        ({"train_labels": np.zeros((11, 1), np.uint8)}, "N = 12"),
        ({"val_labels": np.full((4, 1), 7, np.uint8)}, r"val_labels holds \[7\], outside 0..1"),
    ],
)
def test_bad_npz_errors_name_file_and_key(tmp_path, overrides, match):
    path = str(tmp_path / "breastmnist.npz")
    write_npz(path, **overrides)
    with pytest.raises(ValueError, match=match) as error:
        medmnist.read_npz(path, "breastmnist")
    assert path in str(error.value)


def test_missing_file_and_manual_dir(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README").write_text("no npz here")
    with pytest.raises(FileNotFoundError, match="breastmnist.npz"):
        datasets.prepare("breastmnist", str(tmp_path / "tfds"), str(tmp_path / "manual"))


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist", "retinamnist"])
def test_real_files_have_the_official_split_sizes(name, tmp_path_factory):
    manual_dir = os.environ.get("MEDJAX_MANUAL_DIR")
    if not manual_dir:
        pytest.skip("MEDJAX_MANUAL_DIR not set")
    if not os.path.isfile(os.path.join(manual_dir, "medmnist", f"{name}.npz")):
        pytest.skip(f"MEDJAX_MANUAL_DIR={manual_dir} has no medmnist/{name}.npz")
    tfds_dir = os.environ.get("MEDJAX_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))
    builder = datasets.prepare(name, tfds_dir, manual_dir)
    sizes = {s: builder.info.splits[s].num_examples for s in SPLITS}
    # The sizes in /work/shared/data/medmnist/PROVENANCE.md (= n_samples of MedMNIST's info.py).
    expected = {
        "pneumoniamnist": {"train": 4708, "validation": 524, "test": 624},
        "breastmnist": {"train": 546, "validation": 78, "test": 156},
        "retinamnist": {"train": 1080, "validation": 120, "test": 400},
    }[name]
    assert sizes == expected == medmnist.INFO[name].num_examples
    assert builder.info.metadata["official_md5"] is True
    train = datasets.load_split(builder, "train")
    counts = np.bincount(train["label"])
    if name == "pneumoniamnist":
        assert counts.tolist() == [1214, 3494]
    if name == "breastmnist":
        assert counts.tolist() == [147, 399]
    if name == "retinamnist":
        assert counts.tolist() == [486, 128, 206, 194, 66]
