"""Dataset name -> TFDS builder class, and the two calls training uses: `prepare` and `load_split`."""

import os

import numpy as np
import tensorflow_datasets as tfds

# Filled by `register` as the dataset modules are imported (medjax.datasets imports them all).
BUILDERS: dict[str, type[tfds.core.DatasetBuilder]] = {}


def register(name: str):
    """Class decorator: makes `config.data.name=name` build this TFDS builder class."""

    def add(cls):
        if name in BUILDERS and BUILDERS[name] is not cls:
            raise ValueError(f"Dataset {name!r} is already registered to {BUILDERS[name].__name__}.")
        BUILDERS[name] = cls
        return cls

    return add


def prepare(
    name: str, tfds_dir: str | None = None, manual_dir: str | None = None, **options
) -> tfds.core.DatasetBuilder:
    """Returns the builder for `name`, preparing the dataset if needed (a prepared one needs no source).

    tfds_dir None uses the TFDS default (or $TFDS_DATA_DIR). manual_dir None uses $MEDJAX_MANUAL_DIR if
    set, else the builder's own source (Medical MNIST downloads; MedMNIST needs a manual dir); builders
    without manual download instructions ignore it. `options` go to the builder class (see prepare_config).
    """
    if name not in BUILDERS:
        raise ValueError(f'Unknown dataset {name!r}; known datasets: {", ".join(BUILDERS)}.')
    builder = BUILDERS[name](data_dir=tfds_dir, **options)
    if not builder.is_prepared():
        if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            manual_dir = None
        elif manual_dir is None:
            manual_dir = os.environ.get("MEDJAX_MANUAL_DIR") or None
        if manual_dir is not None and not os.path.isdir(manual_dir):
            raise FileNotFoundError(f"Manual dir {manual_dir!r} does not exist.")
        if manual_dir is not None and not any(not e.startswith(".") for e in os.listdir(manual_dir)):
            # TFDS would treat an empty manual dir as none given, and Medical MNIST would download.
            raise FileNotFoundError(f"Manual dir {manual_dir!r} is empty.")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def prepare_config(
    data_config, tfds_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """prepare() for a `config.data`: its name, tfds_dir and manual_dir (unless given here), and the
    fields its builder class names in CONFIG_FIELDS (constructor argument -> config.data field)."""
    if data_config.name not in BUILDERS:
        raise ValueError(f'Unknown dataset {data_config.name!r}; known datasets: {", ".join(BUILDERS)}.')
    fields = getattr(BUILDERS[data_config.name], "CONFIG_FIELDS", {})
    options = {arg: data_config.get(field) for arg, field in fields.items()}
    return prepare(
        data_config.name, tfds_dir or data_config.tfds_dir, manual_dir or data_config.manual_dir, **options
    )


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Loads a whole split as numpy arrays, sorted by the builder's `SORT_KEY` feature.

    'image' uint8 [N, H, W, C] and 'label' int32 [N], plus the builder's other features (text as str).
    """
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    arrays = {}
    for key, value in data.items():
        if value.dtype == object:
            value = np.array([v.decode() for v in value], dtype=str)
        arrays[key] = value
    arrays["label"] = arrays["label"].astype(np.int32)
    sort_key = getattr(builder, "SORT_KEY", None)
    if sort_key is not None:
        order = np.argsort(arrays[sort_key], kind="stable")
        arrays = {key: value[order] for key, value in arrays.items()}
    return arrays
