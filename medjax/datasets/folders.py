"""Folders of class subfolders as TFDS datasets: exact duplicates collapsed, splits by content hash.

Shared by the Medical MNIST and image-folder builders. Images are identified by the sha256 of their file
bytes: identical files are collapsed to the lexicographically first file name before splitting, and
each image's split (train / validation / test, ~80/10/10 within every class) depends on its own hash
only, so duplicates never straddle splits and adding or removing images never moves another image.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")


def split_for_hash(sha256_hex: str) -> str:
    """Returns the split of an image from the hex sha256 of its file bytes."""
    u = int(sha256_hex[:16], 16) / 2**64
    if u < 0.8:
        return "train"
    if u < 0.9:
        return "validation"
    return "test"


def class_folders(root: str) -> list[str]:
    """Sorted names of the (non-hidden) subfolders of root; raises if root does not exist."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist.")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan(
    root: str, class_names: Sequence[str], *, require_all: bool, extensions: Sequence[str]
) -> list[tuple[str, int]]:
    """Lists (file_name, label) for the images under root/<Class>/, sorted.

    file_name is the relative path '<Class>/<file>'. Hidden entries and files at the top level of root
    are ignored; anything else unexpected (an unknown, missing or empty class folder, a subfolder or
    non-image file in a class folder) is a ValueError naming it.
    """
    expected = ", ".join(class_names)
    folders = class_folders(root)
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
            if os.path.splitext(entry.name)[1].lower() not in extensions:
                raise ValueError(
                    f"Unexpected non-image file {path!r}; image files must end in {', '.join(extensions)}."
                )
            items.append((f"{folder}/{entry.name}", label))
            num_images += 1
        if not num_images:
            raise ValueError(f"Class folder {class_dir!r} has no images.")
    return sorted(items)


def hash_files(root: str, items: Sequence[tuple[str, int]]) -> dict[str, np.ndarray]:
    """'file_name', 'label' and 'sha256' (hex, of the file bytes) arrays for scanned items."""
    hashes = []
    for file_name, _ in items:
        with open(os.path.join(root, file_name), "rb") as f:
            hashes.append(hashlib.sha256(f.read()).hexdigest())
    return {
        "file_name": np.array([file_name for file_name, _ in items], dtype=str),
        "label": np.array([label for _, label in items], np.int32),
        "sha256": np.array(hashes, dtype=str),
    }


def remove_duplicates(
    examples: dict[str, np.ndarray], root: str, class_names: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Keeps the first file (by file_name) of each group of identical files.

    Returns the kept examples and the number removed per class name. Raises ValueError naming both
    files if identical files are in different classes.
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
        removed[class_names[examples["label"][i]]] += 1
    kept = {key: value[keep] for key, value in examples.items()}
    return kept, dict(sorted(removed.items()))


class HashSplitBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder over a folder of class subfolders, de-duplicated, with content-hash splits.

    Subclasses give the features ('image', 'label', 'file_name', 'sha256'), `_source_root`, `_scan`
    and `_decode` (file bytes and path -> the 'image' array, or ValueError naming the path).
    """

    SORT_KEY = "file_name"  # load_split's order.

    def _source_root(self, dl_manager: tfds.download.DownloadManager) -> str:
        raise NotImplementedError

    def _scan(self, root: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    def _decode(self, data: bytes, path: str) -> np.ndarray:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._source_root(dl_manager)
        examples = hash_files(root, self._scan(root))
        examples, removed = remove_duplicates(examples, root, self.info.features["label"].names)
        self.info.metadata["duplicates_removed"] = sum(removed.values())
        self.info.metadata["duplicates_removed_per_class"] = removed
        splits = np.array([split_for_hash(h) for h in examples["sha256"]])
        for split in SPLITS:
            if not np.any(splits == split):
                raise ValueError(
                    f"No image of {root!r} falls in the {split} split ({len(splits)} distinct images, split "
                    "~80/10/10 by content hash); the folder needs more images."
                )
        return {
            split: self._generate_examples(root, examples, np.flatnonzero(splits == split))
            for split in SPLITS
        }

    def _generate_examples(self, root, examples, indices):
        for i in indices:
            example = {key: value[i] for key, value in examples.items()}
            path = os.path.join(root, example["file_name"])
            with open(path, "rb") as f:
                example["image"] = self._decode(f.read(), path)
            yield example["file_name"], example
