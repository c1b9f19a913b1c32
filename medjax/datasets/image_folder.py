"""A user's folder of class subfolders (PNG, JPEG or DICOM images of any size) as a TFDS dataset.

Class names are the sorted subfolder names. Images are read by `medjax.images` (the reader of
medjax.predict: PNG, JPEG and DICOM rules in docs/predict.md), resized to size x size (bilinear,
averaging over the source pixels when shrinking; the aspect ratio is not kept) and converted to 1 (mean of
R, G and B) or 3 channels (gray repeated). Exact duplicates are collapsed and splits are
assigned by content hash as for Medical MNIST (medjax/datasets/folders.py).

Each (folder, size, channels) and each state of the folder's listing (file names, sizes, modification
times) is prepared once into its own builder config, `<size>px_<channels>ch_<hash>`, so two folders never
share prepared data and a changed folder is prepared again.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from medjax import images
from medjax.datasets import folders
from medjax.datasets import registry

EXTENSIONS = images.EXTENSIONS


def decode(data: bytes, name: str, size: int, channels: int) -> np.ndarray:
    """A PNG, JPEG or DICOM file's bytes as uint8 [size, size, channels], read and fitted exactly as
    medjax.predict reads files (`images.read_image`, `images.fit`), so that a model sees the same pixels
    in training and in prediction. Raises ValueError naming the file (`name`) if it cannot be decoded."""
    try:
        pixels = images.read_image(name, data=data).pixels
        return images.fit(pixels, (size, size, channels))[0]
    except images.ImageError as e:
        raise ValueError(f"Cannot decode image {name!r}: {e}") from e


def read_class_folder(
    root: str | os.PathLike, class_names, size: int, channels: int
) -> dict[str, np.ndarray]:
    """Reads every image under root/<Class>/ (no dedup), decoded as the builder stores them.

    Returns arrays sorted by file_name: 'image' uint8 [N, size, size, channels], 'label' (index into
    class_names), 'file_name' ('<Class>/<file>') and 'sha256'.
    """
    root = os.fspath(root)
    items = folders.scan(root, tuple(class_names), require_all=False, extensions=EXTENSIONS)
    examples = folders.hash_files(root, items)
    pixels = np.empty((len(items), size, size, channels), np.uint8)
    for i, (file_name, _) in enumerate(items):
        path = os.path.join(root, file_name)
        with open(path, "rb") as f:
            pixels[i] = decode(f.read(), path, size, channels)
    return {"image": pixels, **examples}


def _listing(root: str, class_names) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every non-hidden entry in the class folders, sorted."""
    listing = []
    for class_name in class_names:
        for entry in os.scandir(os.path.join(root, class_name)):
            if not entry.name.startswith("."):
                stat = entry.stat()
                listing.append((f"{class_name}/{entry.name}", stat.st_size, stat.st_mtime_ns))
    return sorted(listing)


class FolderConfig(tfds.core.BuilderConfig):
    """Which folder, at which stored size and channels."""

    def __init__(
        self, *, folder: str, size: int, channels: int, class_names: tuple[str, ...], fingerprint: str
    ):
        super().__init__(
            name=f"{size}px_{channels}ch_{fingerprint[:16]}",
            description=f"{folder} at {size}x{size}x{channels}",
        )
        self.folder, self.size, self.channels, self.class_names = folder, size, channels, class_names


def builder_config(folder: str | None, size: int | None, channels: int | None) -> FolderConfig:
    """The builder config of a folder; checks the settings and the class folders (ValueError naming them)."""
    if not folder:
        raise ValueError("config.data.folder is not set; it must name a folder of class subfolders.")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"config.data.stored_image_size={size!r} must be a positive integer.")
    if channels not in (1, 3):
        raise ValueError(f"config.data.stored_channels={channels!r} must be 1 or 3.")
    folder = os.path.abspath(os.path.expanduser(folder))
    class_names = tuple(folders.class_folders(folder))
    if len(class_names) < 2:
        raise ValueError(
            f"Image folder {folder!r} needs at least 2 class subfolders; found {list(class_names)}."
        )
    key = repr((folder, size, channels, class_names, _listing(folder, class_names)))
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    return FolderConfig(
        folder=folder, size=size, channels=channels, class_names=class_names, fingerprint=fingerprint
    )


@registry.register("image_folder")
class ImageFolder(folders.HashSplitBuilder, skip_registration=True):
    """A folder of class subfolders, resized, de-duplicated, with content-hash splits."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images read by medjax.images, as medjax.predict reads them.",
    }
    # See medical_mnist.MedicalMnist.code_path (TFDS 4.9.10 cannot compute it on Python >= 3.9).
    code_path = epath.Path(__file__)
    # registry.prepare_config passes these config.data fields to __init__.
    CONFIG_FIELDS = {"folder": "folder", "size": "stored_image_size", "channels": "stored_channels"}

    def __init__(
        self, *, folder: str | None = None, size: int | None = None, channels: int | None = None, **kwargs
    ):
        super().__init__(config=builder_config(folder, size, channels), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images of {config.folder}, resized to {config.size}x{config.size}x{config.channels}.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(config.size, config.size, config.channels), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=config.class_names),
                    "file_name": tfds.features.Text(),
                    "sha256": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _source_root(self, dl_manager: tfds.download.DownloadManager) -> str:
        return self.builder_config.folder

    def _scan(self, root: str) -> list[tuple[str, int]]:
        return folders.scan(root, self.builder_config.class_names, require_all=True, extensions=EXTENSIONS)

    def _decode(self, data: bytes, path: str) -> np.ndarray:
        return decode(data, path, self.builder_config.size, self.builder_config.channels)
