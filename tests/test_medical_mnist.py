"""Tests for medjax.datasets.medical_mnist (TFDS builder and folder reader)."""

import hashlib
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from etils import epath
from PIL import Image

from medjax.datasets import medical_mnist

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "medical_mnist"
SPLITS = ("train", "validation", "test")
# Identical files in the fixture; the first (lexicographically) is kept.
DUPLICATES = {
    "AbdomenCT/001734.jpeg": "AbdomenCT/001567.jpeg",
    "HeadCT/000046.jpeg": "HeadCT/000044.jpeg",
}


def _fixture_files():
    return sorted(p.relative_to(FIXTURE_DIR).as_posix() for p in FIXTURE_DIR.glob("*/*.jpeg"))


def _sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _build(manual_dir, tfds_dir):
    return medical_mnist.prepare("medical_mnist", str(tfds_dir), str(manual_dir))


def _load_all(builder):
    return {split: medical_mnist.load_split(builder, split) for split in SPLITS}


@pytest.fixture(scope="module")
def fixture_builder(tmp_path_factory):
    # The manual dir holds medical_mnist/<Class>/, like the shared data root.
    return _build(FIXTURE_DIR.parent, tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def fixture_splits(fixture_builder):
    return _load_all(fixture_builder)


@pytest.fixture
def source(tmp_path):
    """A writable copy of the fixture images (<Class>/ folders directly)."""
    dst = tmp_path / "src"
    shutil.copytree(FIXTURE_DIR, dst)
    return dst


def test_fixture_layout():
    files = _fixture_files()
    assert len(files) == 38
    for duplicate, kept in DUPLICATES.items():
        assert _sha256(FIXTURE_DIR / duplicate) == _sha256(FIXTURE_DIR / kept)


def test_builder_info(fixture_builder):
    info = fixture_builder.info
    assert fixture_builder.name == "medical_mnist"
    assert str(fixture_builder.version) == "1.0.0"
    assert "1.0.0" in fixture_builder.RELEASE_NOTES
    assert set(info.features) == {"image", "label", "file_name", "sha256"}
    assert info.features["image"].shape == medical_mnist.IMAGE_SHAPE
    assert info.features["image"].np_dtype == np.uint8
    assert tuple(info.features["label"].names) == medical_mnist.CLASS_NAMES
    assert info.supervised_keys == ("image", "label")


def test_counts_and_arrays(fixture_builder, fixture_splits):
    assert {s: fixture_builder.info.splits[s].num_examples for s in SPLITS} == {
        "train": 24,
        "validation": 6,
        "test": 6,
    }
    for split, data in fixture_splits.items():
        n = fixture_builder.info.splits[split].num_examples
        assert data["image"].shape == (n, 64, 64, 1) and data["image"].dtype == np.uint8
        assert data["label"].shape == (n,) and data["label"].dtype == np.int32
        assert data["file_name"].dtype.kind == "U" and data["sha256"].dtype.kind == "U"
        assert list(data["file_name"]) == sorted(data["file_name"])
        for label, name in zip(data["label"], data["file_name"]):
            assert name.split("/")[0] == medical_mnist.CLASS_NAMES[label]
    # Every class has 4 train, 1 validation and 1 test image in the fixture.
    for split, expected in (("train", 4), ("validation", 1), ("test", 1)):
        counts = np.bincount(fixture_splits[split]["label"], minlength=6)
        assert counts.tolist() == [expected] * 6


def test_dedup_and_metadata_persisted(fixture_builder, fixture_splits):
    names = np.concatenate([d["file_name"] for d in fixture_splits.values()])
    assert len(names) == 36
    for duplicate, kept in DUPLICATES.items():
        assert kept in names and duplicate not in names
    expected = {
        "duplicates_removed": 2,
        "duplicates_removed_per_class": {"AbdomenCT": 1, "HeadCT": 1},
    }
    assert dict(fixture_builder.info.metadata) == expected
    # A fresh builder reads the metadata back from the prepared dataset.
    reloaded = medical_mnist.MedicalMnist(data_dir=fixture_builder.data_dir_root)
    assert reloaded.is_prepared()
    assert dict(reloaded.info.metadata) == expected


def test_splits_follow_content_hash(fixture_splits):
    all_hashes = np.concatenate([d["sha256"] for d in fixture_splits.values()])
    assert len(set(all_hashes)) == len(all_hashes)  # No image in two splits.
    for split, data in fixture_splits.items():
        for name, sha256 in zip(data["file_name"], data["sha256"]):
            assert sha256 == _sha256(FIXTURE_DIR / name)
            assert medical_mnist.split_for_hash(sha256) == split


def test_stored_pixels_equal_read_class_folder(fixture_splits):
    folder = medical_mnist.read_class_folder(FIXTURE_DIR)
    index = {name: i for i, name in enumerate(folder["file_name"])}
    for data in fixture_splits.values():
        rows = [index[name] for name in data["file_name"]]
        np.testing.assert_array_equal(data["image"], folder["image"][rows])
        np.testing.assert_array_equal(data["label"], folder["label"][rows])
        np.testing.assert_array_equal(data["sha256"], folder["sha256"][rows])


def test_split_stability(tmp_path, source, fixture_splits):
    removed = [
        "AbdomenCT/001567.jpeg",  # Its duplicate 001734 must take its place.
        "HeadCT/000044.jpeg",
        "BreastMRI/000027.jpeg",
        *(f"{c}/000002.jpeg" for c in medical_mnist.CLASS_NAMES),
        *(f"{c}/000003.jpeg" for c in medical_mnist.CLASS_NAMES),
    ]
    for name in removed:
        (source / name).unlink()
    rebuilt = _load_all(_build(source, tmp_path / "tfds"))

    before = {sha: split for split, d in fixture_splits.items() for sha in d["sha256"]}
    after_names = set()
    for split, data in rebuilt.items():
        assert len(data["sha256"]) > 0
        for name, sha in zip(data["file_name"], data["sha256"]):
            assert before[sha] == split, name
            after_names.add(name)
    assert "AbdomenCT/001734.jpeg" in after_names
    assert "HeadCT/000046.jpeg" in after_names
    assert len(after_names) == 36 - len(removed) + 2


def test_split_for_hash_proportions():
    rng = np.random.default_rng(0)
    splits = [medical_mnist.split_for_hash(rng.bytes(32).hex()) for _ in range(20000)]
    fractions = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert fractions["train"] == pytest.approx(0.8, abs=0.015)
    assert fractions["validation"] == pytest.approx(0.1, abs=0.015)
    assert fractions["test"] == pytest.approx(0.1, abs=0.015)
    assert medical_mnist.split_for_hash("0" * 64) == "train"
    assert medical_mnist.split_for_hash("d" + "0" * 63) == "validation"
    assert medical_mnist.split_for_hash("f" * 64) == "test"
    # Only the first 16 hex digits matter.
    assert medical_mnist.split_for_hash("f" * 16 + "0" * 48) == "test"


def test_read_class_folder_on_fixture():
    data = medical_mnist.read_class_folder(FIXTURE_DIR)
    files = _fixture_files()
    assert data["file_name"].tolist() == files  # Sorted, duplicates kept.
    assert data["image"].shape == (38, 64, 64, 1) and data["image"].dtype == np.uint8
    assert data["label"].dtype == np.int32
    assert data["sha256"].tolist() == [_sha256(FIXTURE_DIR / f) for f in files]
    expected = Image.open(FIXTURE_DIR / "Hand/000000.jpeg")
    i = files.index("Hand/000000.jpeg")
    np.testing.assert_array_equal(data["image"][i, :, :, 0], np.asarray(expected))
    assert data["label"][i] == medical_mnist.CLASS_NAMES.index("Hand")


def test_read_class_folder_subset(source):
    for name in ("AbdomenCT", "BreastMRI", "ChestCT", "HeadCT"):
        shutil.rmtree(source / name)
    (source / "CXR" / ".DS_Store").write_bytes(b"hidden")  # Ignored.
    (source / "NOTES.txt").write_text("top-level files are ignored")
    data = medical_mnist.read_class_folder(source)
    assert sorted(set(data["label"].tolist())) == [2, 4]  # CXR, Hand.
    assert len(data["file_name"]) == 12
    custom = medical_mnist.read_class_folder(source, class_names=("Hand", "CXR"))
    assert custom["label"][custom["file_name"] == "Hand/000000.jpeg"].tolist() == [0]


def test_read_class_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="No class folders"):
        medical_mnist.read_class_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        medical_mnist.read_class_folder(tmp_path / "nowhere")


def test_decode_image():
    path = FIXTURE_DIR / "CXR/000000.jpeg"
    image = medical_mnist.decode_image(path)
    assert image.shape == (64, 64, 1) and image.dtype == np.uint8
    np.testing.assert_array_equal(medical_mnist.decode_image(path.read_bytes()), image)
    with pytest.raises(ValueError, match="my-image"):
        medical_mnist.decode_image(b"garbage", name="my-image")


def _truncate(source):
    path = source / "Hand/000000.jpeg"
    path.write_bytes(path.read_bytes()[:300])
    return "Hand/000000.jpeg", "Cannot decode"


def _not_an_image(source):
    (source / "Hand/000001.jpeg").write_bytes(b"this is not a jpeg")
    return "Hand/000001.jpeg", "Cannot decode"


def _wrong_size(source):
    Image.new("L", (32, 64)).save(source / "ChestCT/small.png")
    return "ChestCT/small.png", "found 32x64 mode 'L'"


def _rgb(source):
    Image.open(source / "CXR/000000.jpeg").convert("RGB").save(source / "CXR/rgb.jpeg")
    return "CXR/rgb.jpeg", "found 64x64 mode 'RGB'"


def _unknown_class(source):
    (source / "Knee").mkdir()
    shutil.copy(source / "Hand/000000.jpeg", source / "Knee/000000.jpeg")
    return "Knee", "expected class folders: AbdomenCT, BreastMRI"


def _empty_class(source):
    for path in (source / "BreastMRI").iterdir():
        path.unlink()
    (source / "BreastMRI" / ".DS_Store").write_bytes(b"")  # Hidden: not an image.
    return "BreastMRI", "has no images"


def _stray_file(source):
    (source / "Hand/notes.txt").write_text("not an image")
    return "Hand/notes.txt", "non-image file"


BAD_INPUTS = [
    _truncate,
    _not_an_image,
    _wrong_size,
    _rgb,
    _unknown_class,
    _empty_class,
    _stray_file,
]


@pytest.mark.parametrize("corrupt", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_errors(tmp_path, source, corrupt):
    name, message = corrupt(source)
    for read in (
        medical_mnist.read_class_folder,
        lambda root: _build(root, tmp_path / "tfds"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            read(source)
        assert str(source / name) in str(error.value)


def test_missing_class_folder(tmp_path, source):
    shutil.rmtree(source / "BreastMRI")
    with pytest.raises(ValueError, match="is missing") as error:
        _build(source, tmp_path / "tfds")
    assert str(source / "BreastMRI") in str(error.value)
    # read_class_folder accepts a subset of the classes.
    assert 1 not in medical_mnist.read_class_folder(source)["label"]


def test_cross_class_duplicate(tmp_path, source):
    shutil.copy(source / "Hand/000000.jpeg", source / "CXR/copy.jpeg")
    with pytest.raises(ValueError, match="different classes") as error:
        _build(source, tmp_path / "tfds")
    assert str(source / "CXR/copy.jpeg") in str(error.value)
    assert str(source / "Hand/000000.jpeg") in str(error.value)
    # read_class_folder does no dedup, so it reads both.
    assert len(medical_mnist.read_class_folder(source)["file_name"]) == 39


def _mednist_folder(source, manual_dir):
    shutil.copytree(source, manual_dir / "MedNIST")


def _mednist_tarball(source, manual_dir):
    manual_dir.mkdir()
    with tarfile.open(manual_dir / "MedNIST.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="MedNIST")


@pytest.mark.parametrize("layout", [_mednist_folder, _mednist_tarball], ids=["folder", "tarball"])
def test_manual_dir_layouts(tmp_path, source, layout):
    manual_dir = tmp_path / "manual"
    layout(source, manual_dir)
    builder = _build(manual_dir, tmp_path / "tfds")
    assert builder.info.splits.total_num_examples == 36


def test_manual_dir_without_images(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README.md").write_text("nothing here")
    with pytest.raises(ValueError, match="No Medical MNIST images found"):
        _build(tmp_path / "manual", tmp_path / "tfds")


def test_prepare_env_manual_dir_and_reuse(tmp_path, source, monkeypatch):
    # Classes directly under the manual dir, taken from the env var.
    monkeypatch.setenv("MEDJAX_MANUAL_DIR", str(source))
    builder = medical_mnist.prepare("medical_mnist", str(tmp_path / "tfds"), None)
    assert builder.info.splits.total_num_examples == 36
    # Once prepared, no source is needed (nothing is downloaded).
    monkeypatch.delenv("MEDJAX_MANUAL_DIR")
    shutil.rmtree(source)
    again = medical_mnist.prepare("medical_mnist", str(tmp_path / "tfds"), None)
    assert again.info.splits.total_num_examples == 36


def test_prepare_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="known datasets: medical_mnist"):
        medical_mnist.prepare("imagenet", str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        medical_mnist.prepare("medical_mnist", str(tmp_path), str(tmp_path / "nowhere"))


class _FakeDownloadManager:
    def __init__(self, path):
        self.path = path
        self.urls = []

    def download(self, url):
        self.urls.append(url)
        return epath.Path(self.path)


def test_download_checks_md5(tmp_path):
    archive = tmp_path / "MedNIST.tar.gz"
    archive.write_bytes(b"not the real archive")
    dl_manager = _FakeDownloadManager(archive)
    builder = medical_mnist.MedicalMnist(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="MD5 mismatch") as error:
        builder._download(dl_manager)
    assert str(archive) in str(error.value)
    assert dl_manager.urls == [medical_mnist.MEDNIST_URL]


def test_real_dataset(real_medical_mnist_builder):
    builder = real_medical_mnist_builder
    splits = {split: medical_mnist.load_split(builder, split) for split in SPLITS}
    assert sum(len(d["label"]) for d in splits.values()) == 55514
    all_hashes = np.concatenate([d["sha256"] for d in splits.values()])
    assert len(np.unique(all_hashes)) == len(all_hashes)

    reloaded = medical_mnist.MedicalMnist(data_dir=builder.data_dir_root)
    assert reloaded.info.metadata["duplicates_removed"] == 440
    assert reloaded.info.metadata["duplicates_removed_per_class"] == {
        "HeadCT": 93,
        "AbdomenCT": 346,
        "CXR": 1,
    }

    counts = np.stack([np.bincount(splits[s]["label"], minlength=6) for s in SPLITS])
    fractions = counts / counts.sum(axis=0)
    for c, name in enumerate(medical_mnist.CLASS_NAMES):
        assert abs(fractions[0, c] - 0.8) <= 0.02, name
        assert abs(fractions[1, c] - 0.1) <= 0.02, name
        assert abs(fractions[2, c] - 0.1) <= 0.02, name
