"""medjax.predict and medjax.images on a mixed folder of good and bad files, and medjax.explain's maps.

One quick training run (non-default preprocessing) is shared; the folder holds PNG, JPEG, 16-bit PNG and
DICOM files written here, and one file of each kind of failure.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pydicom
import pytest
from PIL import Image

from configs import quick
from medjax import datasets, explain, images, models, predict, steps, train, transfer
from medjax.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_ROOT = os.path.join(REPO, "tests", "fixtures")
# Far from configs/base.py's mean 0.5, std 0.25, image_size 0 and channels 0 (as stored: 64x64x1).
MEAN, STD, IMAGE_SIZE, CHANNELS = 0.1, 0.9, 40, 3
CLASS_NAMES = list(datasets.CLASS_NAMES)
# DICOM test image: stored values, rescale slope / intercept, window (PS3.3 C.11.2.1.2.1, LINEAR).
SLOPE, INTERCEPT, CENTER, WIDTH = 2.0, -1000.0, 400.0, 1000.0
ERRORS = {  # File name -> what its error must say.
    "multiframe.dcm": "multi-frame DICOM (2 frames)",
    "truncated.jpeg": "image file is truncated",
    "report.png": "not a PNG, JPEG or DICOM image",
    "bomb.png": "10000x10000 = 100000000 pixels is over the limit of 67108864",
    "missing.png": "cannot read the file: No such file or directory",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = quick.get_config()
    config.data.manual_dir = FIXTURE_ROOT
    config.data.tfds_dir = str(root / "tfds")
    config.data.mean, config.data.std = MEAN, STD
    config.data.image_size, config.data.channels = IMAGE_SIZE, CHANNELS
    train.train_and_evaluate(config, str(root / "run"))
    return str(root / "run")


def _fixture_jpeg(name="Hand"):
    folder = os.path.join(FIXTURE_ROOT, "medical_mnist", name)
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def _dicom(path, stored, photometric, frames=1):
    """A secondary-capture DICOM file of uint16 `stored` [frames, H, W] values, with a rescale and window."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    ds.WindowCenter, ds.WindowWidth = CENTER, WIDTH
    ds.PixelData = stored[:frames].astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _windowed(stored):
    """The 8-bit pixels the DICOM rules give for `stored` values (MONOCHROME2)."""
    values = stored.astype(np.float64) * SLOPE + INTERCEPT
    y = np.clip((values - (CENTER - 0.5)) / (WIDTH - 1) + 0.5, 0, 1) * 255
    return np.round(y).astype(np.uint8)[:, :, None]


def _bomb(path, side=10000):
    """A small PNG (about 100 kB) that decodes to side x side gray pixels."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row, parts = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(folder, {file name: expected uint8 pixels or None where only the fitted pixels are known})."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    expected = {}
    shutil.copy(_fixture_jpeg("Hand"), folder / "hand.jpeg")
    expected["hand.jpeg"] = datasets.decode_image(_fixture_jpeg("Hand"))
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    expected["rgb.png"] = np.round(rgb.mean(axis=2, keepdims=True)).astype(np.uint8)
    Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8)).save(folder / "wide.png")
    expected["wide.png"] = None
    deep = rng.integers(0, 65536, (64, 64), dtype=np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    expected["deep16.png"] = np.round(deep * (255 / 65535)).astype(np.uint8)[:, :, None]
    (folder / "dicom").mkdir()
    stored = np.clip(rng.normal(700, 300, (2, 64, 64)), 0, 4095).astype(np.uint16)
    _dicom(folder / "dicom" / "mono2.dcm", stored, "MONOCHROME2")
    expected["mono2.dcm"] = _windowed(stored[0])
    _dicom(folder / "dicom" / "IM0001", stored, "MONOCHROME1")  # No extension: found by its preamble.
    expected["IM0001"] = 255 - _windowed(stored[0])
    _dicom(folder / "dicom" / "multiframe.dcm", stored, "MONOCHROME2", frames=2)
    data = open(_fixture_jpeg("CXR"), "rb").read()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "report.png").write_text("Findings: none.\n")
    (folder / "notes.txt").write_text("not an image name: skipped\n")
    _bomb(folder / "bomb.png")
    return folder, expected


@pytest.fixture(scope="module")
def report(workdir, mixed):
    folder, _ = mixed
    model = predict.Model(workdir, batch_size=8)  # 6 good files in batches of 8 and 4 bad ones.
    return predict.predict_files(model, [str(folder), str(folder / "missing.png")])


def _reference_probabilities(workdir, pixels):
    """evaluate's step (steps.eval_step) on `pixels` with the preprocessing set above, built here."""
    _, model, variables = transfer.load_source(workdir)
    probs = steps.eval_step(
        variables, jnp.asarray(pixels), model=model, mean=MEAN, std=STD, image_size=IMAGE_SIZE, channels=3
    )
    return np.asarray(probs)


def _by_name(report):
    return {os.path.basename(row["file"]): row for row in report["files"]}


def test_read_image_applies_the_format_rules(mixed):
    folder, expected = mixed
    for name in ("hand.jpeg", "deep16.png", "dicom/mono2.dcm", "dicom/IM0001"):
        decoded = images.read_image(str(folder / name))
        np.testing.assert_array_equal(decoded.pixels, expected[os.path.basename(name)], err_msg=name)
    notes = images.read_image(str(folder / "dicom" / "IM0001")).notes
    assert "MONOCHROME1 inverted" in notes and "window center 400 width 1000 (LINEAR)" in notes
    assert "rescale slope 2.0 intercept -1000.0" in notes


def test_exif_orientation_is_applied_and_bytes_read_like_the_file(tmp_path):
    pixels = (np.arange(4 * 6).reshape(4, 6) * 10).astype(np.uint8)  # 4 rows, 6 columns.
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6  # Shown rotated 90 degrees clockwise.
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    decoded = images.read_image(str(path))
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], np.rot90(pixels, k=-1))
    assert "EXIF orientation 6 applied" in decoded.notes
    from_bytes = images.read_image("rotated.png", data=path.read_bytes())
    np.testing.assert_array_equal(from_bytes.pixels, decoded.pixels)


def test_predictions_for_good_files_equal_evaluation_on_the_same_pixels(workdir, mixed, report):
    folder, expected = mixed
    rows = _by_name(report)
    assert report["class_names"] == CLASS_NAMES
    assert report["checkpoint_step"] == max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")))
    assert report["skipped"] == [str(folder / "notes.txt")]
    good = sorted(expected)
    pixels = []
    for name in good:
        assert "error" not in rows[name], rows[name]
        known = expected[name]
        if known is None:  # Resized: the pixels medjax.images.fit gives.
            known, notes = images.fit(images.read_image(str(folder / name)).pixels, (64, 64, 1))
            assert notes == ("resized from 120x90 to 64x64 (bilinear)",)
        pixels.append(known)
    assert "converted from 3 to 1 channels" in rows["rgb.png"]["notes"]
    probs = _reference_probabilities(workdir, np.stack(pixels))
    for name, p in zip(good, probs):
        row = rows[name]
        assert list(row["probabilities"]) == CLASS_NAMES
        np.testing.assert_allclose(list(row["probabilities"].values()), p, atol=2e-6, err_msg=name)
        assert row["top_class"] == CLASS_NAMES[int(np.argmax(p))]
        assert row["top_probability"] == max(row["probabilities"].values())


def test_each_bad_file_gets_its_own_error(mixed, report):
    rows = _by_name(report)
    assert report["num_files"] == len(mixed[1]) + len(ERRORS) and report["num_failed"] == len(ERRORS)
    for name, message in ERRORS.items():
        assert message in rows[name].get("error", ""), (name, rows[name])
        assert "probabilities" not in rows[name]


def test_cli_writes_csv_and_overlays_and_exits_3_on_file_errors(workdir, mixed, tmp_path):
    folder, expected = mixed
    output, overlays = tmp_path / "out" / "report.csv", tmp_path / "explain"
    run = _run(f"--workdir={workdir}", f"--output={output}", f"--explain={overlays}", folder)
    assert run.returncode == predict.EXIT_FILE_ERRORS == 3, run.stderr[-3000:]
    assert f"{folder / 'wide.png'}: resized from 120x90 to 64x64" in run.stderr
    with open(output, newline="") as f:
        reader = csv.DictReader(f)
        lines = {os.path.basename(line["file"]): line for line in reader}
    assert reader.fieldnames == [
        "file",
        "status",
        "top_class",
        "top_probability",
        *[f"probability_{c}" for c in CLASS_NAMES],
        "notes",
        "error",
        "gradcam",
        "occlusion",
    ]
    assert set(lines) == set(expected) | set(ERRORS) - {"missing.png"}
    for name in expected:
        line = lines[name]
        assert line["status"] == "ok" and not line["error"]
        probs = [float(line[f"probability_{c}"]) for c in CLASS_NAMES]
        assert float(line["top_probability"]) == max(probs) and line["top_class"] in CLASS_NAMES
        for method in ("gradcam", "occlusion"):
            overlay = Image.open(line[method])
            assert os.path.dirname(line[method]) == str(overlays) and overlay.size == (256, 256)
            assert overlay.mode == "RGB"
    for name in set(ERRORS) - {"missing.png"}:
        assert lines[name]["status"] == "error" and ERRORS[name] in lines[name]["error"]
        assert not lines[name]["top_class"]


def test_run_prints_json_and_returns_0_when_every_file_succeeds(workdir, mixed, report, tmp_path, capsys):
    folder, _ = mixed
    status = predict.run(
        workdir, [str(folder / "hand.jpeg"), str(folder / "dicom" / "mono2.dcm")], batch_size=8
    )
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_failed"] == 0 and printed["num_files"] == 2
    expected = _by_name(report)
    for row in printed["files"]:
        assert set(row) == {"file", "notes", "top_class", "top_probability", "probabilities"}
        assert row["probabilities"] == expected[os.path.basename(row["file"])]["probabilities"]
    path = tmp_path / "report.json"
    predict.write_report(report, str(path))
    assert json.load(open(path)) == report


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "medjax.predict", *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )


# ----------------------------------------------------------------------------------------------------
# Explanations point at what decides the class.

SIDE, PATCH, MARGIN = 32, 6, 2  # MARGIN: the last stage's stride.


def _patch_images(rng, n):
    """Noise in 0..100; label 1 images carry one PATCH x PATCH square of 255 at a random position."""
    x = rng.integers(0, 101, (n, SIDE, SIDE, 1)).astype(np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int32)
    corners = rng.integers(0, SIDE - PATCH + 1, (n, 2))
    for image, label, (top, left) in zip(x, labels, corners):
        if label:
            image[top : top + PATCH, left : left + PATCH] = 255
    return x, labels, corners


def _on_patch(heat, corner):
    top, left = corner
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    return top - MARGIN <= row < top + PATCH + MARGIN and left - MARGIN <= col < left + PATCH + MARGIN


def _patch_model():
    """A two-stage ResNet (global pooling, then a dense head) trained for 30 steps on `_patch_images`:
    (model, variables, normalisation)."""
    model = resnet.ResNet(
        num_classes=2, stage_sizes=(1, 1), block_cls=resnet.BasicBlock, stem="small", width=8
    )
    rng, prep, tx = np.random.default_rng(1), dict(mean=0.2, std=0.3), optax.adam(1e-2)
    state = steps.init_state(model, tx, jax.random.key(0), (SIDE, SIDE, 1))
    step = jax.jit(
        lambda state, batch: steps.train_step(
            state, batch, model=model, tx=tx, dropout_key=jax.random.key(1), label_smoothing=0.0, **prep
        )
    )
    for _ in range(30):
        x, y, _ = _patch_images(rng, 32)
        state, _ = step(state, {"image": x, "label": y})
    return model, {"params": state.params, "batch_stats": state.batch_stats}, prep


def test_explanation_maps_peak_on_the_patch_that_decides_the_class():
    """A tiny CNN learns 'has a bright patch'; on held-out patch images, both maps peak within MARGIN
    pixels of the patch for at least 80% of the images (a random peak would land there about 10% of the
    time)."""
    model, variables, prep = _patch_model()
    x, y, corners = _patch_images(np.random.default_rng(2), 32)
    probabilities = jax.jit(lambda images: steps.eval_step(variables, images, model=model, **prep))
    assert np.mean(np.argmax(probabilities(x), -1) == y) >= 0.9
    x, corners = x[y == 1][:12], corners[y == 1][:12]

    grad_cam = explain.GradCam(model, variables, (SIDE, SIDE, 1), prep)
    assert grad_cam.stage == (("layer2_0",), 0) and grad_cam.activation_shape == (1, 16, 16, 16)
    maps, tops = grad_cam(x, 32)
    assert maps.shape == x.shape[:3] and maps.min() >= 0 and maps.max() == 1
    cam_hits = np.mean([_on_patch(m, c) for m, c in zip(maps, corners)])
    occlusion_hits = np.mean(
        [
            _on_patch(explain.occlusion(probabilities, image, int(top), mean=prep["mean"]), c)
            for image, top, c in zip(x, tops, corners)
        ]
    )
    assert cam_hits >= 0.8 and occlusion_hits >= 0.8, (cam_hits, occlusion_hits)


@pytest.mark.parametrize(
    "name, stage",
    [("resnet18", "layer4_1"), ("efficientnet_lite0", "bn1"), ("vgg11", "conv8"), ("lenet5", "conv2")],
)
def test_grad_cam_stage_is_the_last_4d_module_output_of_zoo_models(name, stage):
    """The module whose output feeds global pooling or flatten (found by an abstract pass only)."""
    model = models.create_model(ml_collections.ConfigDict({"name": name}), 3)
    shape = (64, 64, 1)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
    assert explain.last_conv_stage(model, variables, shape) == ((stage,), 0)
