"""The image_folder dataset: a generated folder of PNG, JPEG and DICOM images of several sizes is
de-duplicated, split by content hash, resized, trained on and evaluated end to end."""

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import quick
from medjax import datasets, evaluate, train
from medjax.datasets import folders, image_folder

CLASSES = ("normal", "effusion", "nodule")  # Created in this order; the class names are sorted.
SIZE = 32
SPLITS = ("train", "validation", "test")


def _dicom_bytes(pixels, *, slope=1.0, intercept=0.0, window=None, photometric="MONOCHROME2", frames=1):
    """An uncompressed 16-bit DICOM file holding `pixels` (uint16 [H, W], or [frames, H, W])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage.
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_image(path, rng, label, size, mode, fmt):
    """A noisy image with a class-specific stripe pattern."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pattern = (np.sin((x, y, x + y)[label] / 3.0) + 1.0) * 80.0
    pixels = np.clip(pattern + rng.normal(0, 30, (height, width)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGB":
        image = Image.merge("RGB", (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image))
    image.save(path, format=fmt)


def _make_folder(root, num_per_class=20, seed=0):
    """CLASSES x num_per_class images (PNG gray/RGB, JPEG, one DICOM each), plus one duplicate per class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(num_per_class - 1):
            size = (int(rng.integers(24, 90)), int(rng.integers(24, 90)))
            mode, fmt, ext = [("L", "PNG", "png"), ("RGB", "PNG", "png"), ("RGB", "JPEG", "jpg")][i % 3]
            _write_image(root / name / f"img{i:02d}.{ext}", rng, label, size, mode, fmt)
        raw = rng.integers(0, 4000, (40, 48)).astype(np.uint16)
        (root / name / "scan.dcm").write_bytes(_dicom_bytes(raw, window=(2000, 4000)))
        shutil.copy(root / name / "img00.png", root / name / "zz_copy_of_img00.png")
    (root / "README.txt").write_text("Files at the top level are ignored.")
    return root


def _config(folder, tfds_dir):
    config = quick.get_config()
    config.data.name = "image_folder"
    config.data.folder = str(folder)
    config.data.stored_image_size = SIZE
    config.data.stored_channels = 1
    config.data.tfds_dir = str(tfds_dir)
    config.train.num_epochs = 1.0
    return config


def _splits(builder):
    return {split: datasets.load_split(builder, split) for split in SPLITS}


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A generated folder, prepared: (config, builder, splits)."""
    root = tmp_path_factory.mktemp("image_folder")
    config = _config(_make_folder(root / "images"), root / "tfds")
    builder = datasets.prepare_config(config.data)
    return config, builder, _splits(builder)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A quick run on the prepared folder: (config, workdir, reports)."""
    config = prepared[0]
    workdir = str(tmp_path_factory.mktemp("run"))
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_class_names_are_the_sorted_subfolders(prepared):
    _, builder, _ = prepared
    assert builder.info.features["label"].names == sorted(CLASSES)


def test_duplicates_collapsed_and_splits_follow_the_content_hash(prepared):
    config, builder, splits = prepared
    names = np.concatenate([splits[s]["file_name"] for s in SPLITS])
    assert len(names) == len(set(names)) == 3 * 20  # 21 files per class, one a copy.
    assert not any("zz_copy_of" in n for n in names)
    assert builder.info.metadata["duplicates_removed_per_class"] == {c: 1 for c in sorted(CLASSES)}
    for split in SPLITS:
        for name, sha256 in zip(splits[split]["file_name"], splits[split]["sha256"]):
            assert sha256 == _sha256(os.path.join(config.data.folder, name))
            assert folders.split_for_hash(sha256) == split, name


def test_splits_are_stratified(prepared):
    _, _, splits = prepared
    class_names = sorted(CLASSES)
    for label, name in enumerate(class_names):
        counts = [int(np.sum(splits[s]["label"] == label)) for s in SPLITS]
        assert 0.6 <= counts[0] / sum(counts) <= 0.95 and counts[1] + counts[2] > 0, (name, counts)
        for split in SPLITS:
            in_split = [n for n in splits[split]["file_name"] if n.startswith(name + "/")]
            assert all(splits[split]["label"][np.isin(splits[split]["file_name"], in_split)] == label)


def test_images_are_resized_and_converted(prepared):
    config, _, splits = prepared
    arrays = {n: image for s in SPLITS for n, image in zip(splits[s]["file_name"], splits[s]["image"])}
    assert all(image.shape == (SIZE, SIZE, 1) and image.dtype == np.uint8 for image in arrays.values())
    for name in ("normal/img01.png", "effusion/img02.jpg", "nodule/img00.png"):  # RGB PNG, JPEG, gray PNG.
        with Image.open(os.path.join(config.data.folder, name)) as source:
            assert source.size != (SIZE, SIZE)
            gray = np.round(np.asarray(source.convert("RGB"), np.float64).mean(axis=2)).astype(np.uint8)
            expected = np.asarray(Image.fromarray(gray).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(arrays[name][:, :, 0], expected)
    assert arrays["normal/scan.dcm"].std() > 20  # The DICOM's window spreads its values over 0..255.


def test_split_stable_when_an_image_is_added_and_folders_do_not_collide(prepared, tmp_path):
    config, builder, splits = prepared
    copy = tmp_path / "copy"
    shutil.copytree(config.data.folder, copy)  # Same files and modification times, another path.
    same = datasets.prepare_config(_config(copy, config.data.tfds_dir).data)
    _write_image(copy / "nodule" / "new.png", np.random.default_rng(99), 2, (50, 40), "L", "PNG")
    grown = datasets.prepare_config(_config(copy, config.data.tfds_dir).data)
    assert len({builder.data_dir, same.data_dir, grown.data_dir}) == 3
    before = {n: s for s in SPLITS for n in splits[s]["file_name"]}
    after = {n: s for s, arrays in _splits(grown).items() for n in arrays["file_name"]}
    assert after.pop("nodule/new.png") == folders.split_for_hash(_sha256(copy / "nodule" / "new.png"))
    assert after == before


def test_evaluate_prepares_the_split_and_reads_folders(trained, tmp_path):
    config, workdir, reports = trained
    assert set(reports) == {"validation", "test"}
    assert json.load(open(os.path.join(workdir, "config.json")))["class_names"] == sorted(CLASSES)
    # Evaluation prepares the dataset from the config in the checkpoint (here into a fresh TFDS dir).
    report = evaluate.evaluate_checkpoint(workdir, split="test", tfds_dir=str(tmp_path / "tfds"))
    assert report["num_examples"] == reports["test"]["num_examples"] > 0
    assert report["accuracy"] == reports["test"]["accuracy"]
    assert report["class_names"] == sorted(CLASSES)
    report = evaluate.evaluate_checkpoint(workdir, folder=config.data.folder)  # Every file, any size.
    assert report["num_examples"] == 3 * 21


def test_dicom_rescale_window_and_monochrome1():
    raw = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40)
    hu = raw * 2.0 - 1000.0
    expected = np.round(np.clip((hu - (0 - 0.5)) / (400 - 1) + 0.5, 0, 1) * 255).astype(np.uint8)
    data = _dicom_bytes(raw, slope=2.0, intercept=-1000.0, window=(0, 400))
    np.testing.assert_array_equal(image_folder.decode(data, "a.dcm", 40, 1)[:, :, 0], expected)
    inverted = image_folder.decode(
        _dicom_bytes(raw, slope=2.0, intercept=-1000.0, window=(0, 400), photometric="MONOCHROME1"),
        "b.dcm",
        40,
        1,
    )
    np.testing.assert_array_equal(inverted[:, :, 0], 255 - expected)
    no_window = image_folder.decode(_dicom_bytes(raw), "c.dcm", 40, 3)
    assert no_window.shape == (40, 40, 3) and no_window.min() == 0 and no_window.max() == 255


@pytest.fixture
def small_folder(tmp_path):
    root = tmp_path / "small"
    rng = np.random.default_rng(1)
    for label, name in enumerate(("a", "b")):
        os.makedirs(root / name)
        for i in range(12):
            _write_image(root / name / f"{i}.png", rng, label, (30, 20), "L", "PNG")
    return root


def _break_undecodable(root):
    (root / "a" / "1.png").write_bytes(b"not an image")
    return "a/1.png"


def _break_empty_class(root):
    os.makedirs(root / "c")
    return "c"


def _break_cross_class_duplicate(root):
    shutil.copy(root / "a" / "0.png", root / "b" / "copy.png")
    return "b/copy.png"


def _break_non_image(root):
    (root / "b" / "notes.txt").write_text("x")
    return "b/notes.txt"


def _break_multi_frame(root):
    (root / "b" / "cine.dcm").write_bytes(_dicom_bytes(np.zeros((2, 8, 8), np.uint16), frames=2))
    return "b/cine.dcm"


def _break_too_few_images(root):
    for name in ("a", "b"):
        for i in range(2, 12):
            os.remove(root / name / f"{i}.png")
    return ""  # The error names the folder.


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (_break_undecodable, "Cannot decode image"),
        (_break_empty_class, "has no images"),
        (_break_cross_class_duplicate, "different classes"),
        (_break_non_image, "non-image file"),
        (_break_multi_frame, "multi-frame"),
        (_break_too_few_images, "No image of .* falls in the"),
    ],
)
def test_bad_files_stop_the_build_naming_the_file(small_folder, tmp_path, corrupt, message):
    config = _config(small_folder, tmp_path / "tfds")
    datasets.prepare_config(config.data)  # The intact folder prepares.
    bad = os.path.normpath(os.path.join(small_folder, corrupt(small_folder)))
    with pytest.raises(ValueError, match=message) as error:
        datasets.prepare_config(config.data)
    assert repr(bad) in str(error.value)


def test_bad_settings_are_named(small_folder):
    for fields, message in (
        ({"folder": None}, "config.data.folder is not set"),
        ({"stored_image_size": 0}, "stored_image_size=0"),
        ({"stored_channels": 2}, "stored_channels=2"),
    ):
        config = _config(small_folder, "unused")
        config.data.update(fields)
        with pytest.raises(ValueError, match=message):
            datasets.prepare_config(config.data)
