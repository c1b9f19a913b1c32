"""Medical MNIST (MONAI MedNIST): 64x64 grayscale images in 6 classes, as TFDS.

Exact duplicates (same file bytes) are collapsed before splitting, and each
image's split depends only on its own content hash, so splits never leak
duplicates and stay stable when images are added or removed.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from medjax.datasets import registry
from medjax.datasets.registry import load_split, prepare  # noqa: F401  (kept importable from here)

CLASS_NAMES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
IMAGE_SHAPE = (64, 64, 1)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "validation", "test")

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


def split_for_hash(sha256_hex: str) -> str:
    """Returns the split of an image from the hex sha256 of its file bytes."""
    u = int(sha256_hex[:16], 16) / 2**64
    if u < 0.8:
        return "train"
    if u < 0.9:
        return "validation"
    return "test"


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


def _scan_class_folders(root: str, class_names: Sequence[str], require_all: bool) -> list[tuple[str, int]]:
    """Lists (file_name, label) for the images under root/<Class>/, sorted.

    file_name is the relative path '<Class>/<file>'. Hidden entries and files
    at the top level of root are ignored; anything else unexpected is an error.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist.")
    expected = ", ".join(class_names)
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    for folder in folders:
        if folder not in class_names:
            raise ValueError(
                f"Unknown class folder {os.path.join(root, folder)!r}; "
                f"expected class folders: {expected}."
            )
    if require_all:
        for class_name in class_names:
            if class_name not in folders:
                raise ValueError(
                    f"Class folder {os.path.join(root, class_name)!r} is missing; "
                    f"expected class folders: {expected}."
                )
    if not folders:
        raise ValueError(f"No class folders in {root!r}; expected some of: {expected}.")

    items = []
    for folder in folders:
        label = class_names.index(folder)
        class_dir = os.path.join(root, folder)
        num_images = 0
        for entry in os.scandir(class_dir):
            if entry.name.startswith("."):
                continue
            path = os.path.join(class_dir, entry.name)
            if not entry.is_file():
                raise ValueError(f"Unexpected non-file entry {path!r} in class folder.")
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"Unexpected non-image file {path!r}; image files must end in "
                    f'{", ".join(IMAGE_EXTENSIONS)}.'
                )
            items.append((f"{folder}/{entry.name}", label))
            num_images += 1
        if not num_images:
            raise ValueError(f"Class folder {class_dir!r} has no images.")
    return sorted(items)


def _read_examples(root: str, class_names: Sequence[str], require_all: bool) -> dict[str, np.ndarray]:
    """Scans, hashes and decodes all images under root (see read_class_folder)."""
    items = _scan_class_folders(root, class_names, require_all)
    images = np.empty((len(items), *IMAGE_SHAPE), np.uint8)
    hashes = []
    for i, (file_name, _) in enumerate(items):
        path = os.path.join(root, file_name)
        with open(path, "rb") as f:
            data = f.read()
        hashes.append(hashlib.sha256(data).hexdigest())
        images[i] = decode_image(data, name=path)
    return {
        "image": images,
        "label": np.array([label for _, label in items], np.int32),
        "file_name": np.array([file_name for file_name, _ in items], dtype=str),
        "sha256": np.array(hashes, dtype=str),
    }


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


def _remove_duplicates(
    examples: dict[str, np.ndarray], root: str
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Keeps the first file (by file_name) of each group of identical files.

    Returns the kept examples and the number removed per class name. Raises
    ValueError if identical files are in different classes.
    """
    first_index = {}
    keep = []
    removed = collections.Counter()
    # Examples are sorted by file_name, so the first one seen is kept.
    for i, sha256 in enumerate(examples["sha256"]):
        j = first_index.setdefault(sha256, i)
        if j == i:
            keep.append(i)
            continue
        if examples["label"][i] != examples["label"][j]:
            raise ValueError(
                "Identical image files in different classes: "
                f'{os.path.join(root, examples["file_name"][j])!r} and '
                f'{os.path.join(root, examples["file_name"][i])!r}.'
            )
        removed[CLASS_NAMES[examples["label"][i]]] += 1
    kept = {key: value[keep] for key, value in examples.items()}
    return kept, dict(sorted(removed.items()))


def _has_class_folder(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, c)) for c in CLASS_NAMES)


@registry.register("medical_mnist")
class MedicalMnist(tfds.core.GeneratorBasedBuilder):
    """Medical MNIST / MedNIST, deduplicated, with content-hash splits."""

    SORT_KEY = "file_name"  # load_split's order, as read_class_folder's.

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

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._source_root(dl_manager)
        examples = _read_examples(root, CLASS_NAMES, require_all=True)
        examples, removed = _remove_duplicates(examples, root)
        self.info.metadata["duplicates_removed"] = sum(removed.values())
        self.info.metadata["duplicates_removed_per_class"] = removed
        splits = np.array([split_for_hash(h) for h in examples["sha256"]])
        return {split: self._generate_examples(examples, np.flatnonzero(splits == split)) for split in SPLITS}

    def _generate_examples(self, examples, indices):
        for i in indices:
            yield examples["file_name"][i], {key: value[i] for key, value in examples.items()}

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
