"""Medical MNIST (MONAI MedNIST): 64x64 grayscale images in 6 classes, as TFDS.

Exact duplicates (same file bytes) are collapsed before splitting, and each
image's split depends only on its own content hash, so splits never leak
duplicates and stay stable when images are added or removed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from medjax.datasets import folders
from medjax.datasets import registry
from medjax.datasets.folders import SPLITS, split_for_hash  # noqa: F401  (kept importable from here)
from medjax.datasets.registry import load_split, prepare  # noqa: F401  (kept importable from here)

CLASS_NAMES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
IMAGE_SHAPE = (64, 64, 1)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

MEDNIST_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/" "0.8.1/MedNIST.tar.gz"
)
MEDNIST_MD5 = "0bc7306e7427e00ad1c5526a6677552d"

_DESCRIPTION = """\
Medical MNIST / MedNIST: 64x64 grayscale medical images in 6 classes
(AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT), made available by
Dr. Bradley J. Erickson (Department of Radiology, Mayo Clinic) under CC BY-SA 4.0.

Exact duplicates (identical file bytes) are collapsed to one example, keeping
the lexicographically first file name. An image is assigned to train /
validation / test (~80/10/10) by the sha256 of its file bytes only.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Optional. Point the manual dir at a folder holding one of:
    <manual_dir>/medical_mnist/<Class>/*.jpeg
    <manual_dir>/<Class>/*.jpeg
    <manual_dir>/MedNIST/<Class>/*.jpeg
    <manual_dir>/MedNIST.tar.gz  (from %s)
where <Class> is one of %s. Without a manual dir, MedNIST.tar.gz is downloaded.
""" % (MEDNIST_URL, ", ".join(CLASS_NAMES))


def decode_image(path_or_bytes: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Decodes a 64x64 grayscale image to uint8 [64, 64, 1].

    Raises ValueError naming the file (`name`, default: the path) if it cannot
    be decoded or is not a 64x64 single-channel 8-bit grayscale image.
    """
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
        name = name or "<bytes>"
    else:
        name = name or os.fspath(path_or_bytes)
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, size = image.mode, image.size
            array = np.asarray(image)
    except Exception as e:  # PIL raises many exception types on bad data.
        raise ValueError(f"Cannot decode image {name!r}: {e}") from e
    if mode != "L" or size != IMAGE_SHAPE[:2]:
        raise ValueError(
            f'Image {name!r} must be 64x64 single-channel grayscale (mode "L"); '
            f"found {size[0]}x{size[1]} mode {mode!r}."
        )
    return array[:, :, None]


def _read_examples(root: str, class_names: Sequence[str], require_all: bool) -> dict[str, np.ndarray]:
    """Scans, hashes and decodes all images under root (see read_class_folder)."""
    items = folders.scan(root, class_names, require_all=require_all, extensions=IMAGE_EXTENSIONS)
    examples = folders.hash_files(root, items)
    images = np.empty((len(items), *IMAGE_SHAPE), np.uint8)
    for i, (file_name, _) in enumerate(items):
        images[i] = decode_image(os.path.join(root, file_name))
    return {"image": images, **examples}


def read_class_folder(
    root: str | os.PathLike, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, np.ndarray]:
    """Reads every image of a folder of class subfolders (no dedup).

    The subfolders must be named after class_names (a subset is fine). Returns
    numpy arrays sorted by file_name: 'image' uint8 [N, 64, 64, 1], 'label'
    int32 [N] (index into class_names), 'file_name' str ('<Class>/<file>') and
    'sha256' str (hex sha256 of the file bytes).
    """
    return _read_examples(os.fspath(root), tuple(class_names), require_all=False)


def _has_class_folder(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, c)) for c in CLASS_NAMES)


@registry.register("medical_mnist")
class MedicalMnist(folders.HashSplitBuilder):
    """Medical MNIST / MedNIST, deduplicated, with content-hash splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: exact duplicates collapsed before splitting; "
            "train/validation/test (~80/10/10) assigned by sha256 of file bytes."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    # TFDS 4.9.10 computes code_path with the `importlib_resources` backport,
    # which it does not install on Python >= 3.9, so preparing would fail with
    # "No module named 'importlib_resources'". This is the path it would find.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # Stores PIL's decoded pixels as lossless PNG rather than
                    # the JPEG bytes: TF's default JPEG decoder gives slightly
                    # different pixels than PIL, so this keeps the dataset
                    # identical to read_class_folder on the same files.
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "file_name": tfds.features.Text(),
                    "sha256": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/apolanco3225/Medical-MNIST-Classification",
            license="CC BY-SA 4.0",
            # Filled in by _split_generators; saved next to the prepared data.
            metadata=tfds.core.MetadataDict(),
        )

    def _scan(self, root: str) -> list[tuple[str, int]]:
        return folders.scan(root, CLASS_NAMES, require_all=True, extensions=IMAGE_EXTENSIONS)

    def _decode(self, data: bytes, path: str) -> np.ndarray:
        return decode_image(data, name=path)

    def _source_root(self, dl_manager: tfds.download.DownloadManager) -> str:
        """Returns the folder holding the <Class>/ folders (downloads if needed)."""
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError:  # No manual dir, or it is missing or empty.
            return self._download(dl_manager)
        # `tfds build --add_name_to_manual_dir` appends the name; accept both.
        for candidate in (
            os.path.join(manual_dir, "medical_mnist"),
            manual_dir,
            os.path.join(manual_dir, "MedNIST"),
        ):
            if _has_class_folder(candidate):
                return candidate
        archive = os.path.join(manual_dir, "MedNIST.tar.gz")
        if os.path.isfile(archive):
            return os.fspath(dl_manager.extract(archive) / "MedNIST")
        raise ValueError(
            f"No Medical MNIST images found in manual dir {manual_dir!r}.\n" + _MANUAL_DOWNLOAD_INSTRUCTIONS
        )

    def _download(self, dl_manager: tfds.download.DownloadManager) -> str:
        archive = dl_manager.download(MEDNIST_URL)
        md5 = hashlib.md5()
        with archive.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                md5.update(chunk)
        if md5.hexdigest() != MEDNIST_MD5:
            raise ValueError(
                f"MD5 mismatch for {os.fspath(archive)!r} downloaded from "
                f"{MEDNIST_URL}: expected {MEDNIST_MD5}, got {md5.hexdigest()}. "
                "Delete the file and retry."
            )
        return os.fspath(dl_manager.extract(archive) / "MedNIST")
