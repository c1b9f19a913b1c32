"""MedMNIST v2 (Yang et al., Scientific Data 2023) 28x28 single-label 2-D datasets as TFDS builders.

Each builder reads the official release file `<manual_dir>/medmnist/<name>.npz` (also accepted:
`<manual_dir>/<name>.npz`) with its official splits train / val / test, named train / validation / test
here. Features: 'image' uint8 [28, 28, C], 'label' with the official class names, and 'index', the
example's position in its split of the .npz file. Nothing is downloaded: get the files from the
MedMNIST release (Zenodo record 10519652). A file whose MD5 differs from the official one is still read
(with a warning; the result is recorded in the dataset's metadata). ChestMNIST is multi-label and not
offered here.
"""

import hashlib
import os
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from medjax.datasets import registry

IMAGE_SIZE = 28
# Official split name in the .npz -> medjax split name.
SPLITS = {"train": "train", "val": "validation", "test": "test"}


class Info(NamedTuple):
    """From medmnist/info.py (MedMNIST v2): class names, channels, split sizes, MD5 of the 28x28 file."""

    class_names: tuple[str, ...]
    channels: int
    num_examples: dict  # {'train': n, 'validation': n, 'test': n}
    md5: str
    license: str
    description: str


def _sizes(train, val, test):
    return {"train": train, "validation": val, "test": test}


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
_CC_BY = "CC BY 4.0"

INFO: dict[str, Info] = {
    "pneumoniamnist": Info(
        ("normal", "pneumonia"),
        1,
        _sizes(4708, 524, 624),
        "28209eda62fecd6e6a2d98b1501bb15f",
        _CC_BY,
        "Pediatric chest X-rays (Kermany et al., Cell 2018): pneumonia vs normal.",
    ),
    "breastmnist": Info(
        ("malignant", "normal, benign"),
        1,
        _sizes(546, 78, 156),
        "750601b1f35ba3300ea97c75c52ff8f6",
        _CC_BY,
        "Breast ultrasound (Al-Dhabyani et al., Data in Brief 2020): malignant vs normal + benign.",
    ),
    "retinamnist": Info(
        ("0", "1", "2", "3", "4"),
        3,
        _sizes(1080, 120, 400),
        "bd4c0672f1bba3e3a89f0e4e876791e4",
        _CC_BY,
        "Retina fundus images (DeepDRiD): 5-level diabetic retinopathy grade.",
    ),
    "pathmnist": Info(
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        3,
        _sizes(89996, 10004, 7180),
        "a8b06965200029087d5bd730944a56c1",
        _CC_BY,
        "Colorectal cancer histology patches (NCT-CRC-HE-100K / CRC-VAL-HE-7K): 9 tissue types.",
    ),
    "dermamnist": Info(
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        3,
        _sizes(7007, 1003, 2005),
        "0744692d530f8e62ec473284d019b0c7",
        "CC BY-NC 4.0",
        "Dermatoscopic images (HAM10000): 7 diseases.",
    ),
    "octmnist": Info(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        1,
        _sizes(97477, 10832, 1000),
        "c68d92d5b585d8d81f7112f81e2d0842",
        _CC_BY,
        "Retinal optical coherence tomography: 4 diagnoses.",
    ),
    "bloodmnist": Info(
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        3,
        _sizes(11959, 1712, 3421),
        "7053d0359d879ad8a5505303e11de1dc",
        _CC_BY,
        "Blood cell microscopy: 8 cell types.",
    ),
    "tissuemnist": Info(
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        1,
        _sizes(165466, 23640, 47280),
        "ebe78ee8b05294063de985d821c1c34b",
        _CC_BY,
        "Kidney cortex cells (BBBC051): 8 cell types.",
    ),
    "organamnist": Info(
        _ORGANS,
        1,
        _sizes(34581, 6491, 17778),
        "866b832ed4eeba67bfb9edee1d5544e6",
        _CC_BY,
        "Abdominal CT, axial (LiTS): 11 organs.",
    ),
    "organcmnist": Info(
        _ORGANS,
        1,
        _sizes(13000, 2392, 8268),
        "0afa5834fb105f7705a7d93372119a21",
        _CC_BY,
        "Abdominal CT, coronal (LiTS): 11 organs.",
    ),
    "organsmnist": Info(
        _ORGANS,
        1,
        _sizes(13940, 2452, 8829),
        "e5c39f1af030238290b9557d9503af9d",
        _CC_BY,
        "Abdominal CT, sagittal (LiTS): 11 organs.",
    ),
}

_CITATION = """\
@article{medmnistv2,
  title={MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
  author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and
          Pfister, Hanspeter and Ni, Bingbing},
  journal={Scientific Data},
  volume={10},
  number={1},
  pages={41},
  year={2023}
}
"""


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_npz(path: str, name: str) -> dict[str, dict[str, np.ndarray]]:
    """Reads and checks a MedMNIST .npz: {split: {'image': uint8 [N, 28, 28, C], 'label': int64 [N]}}.

    Raises ValueError naming the file and what is wrong: missing keys, image shapes or dtypes, label
    shapes or values outside the class range.
    """
    info = INFO[name]
    expected_keys = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types on a corrupt file.
        raise ValueError(f"Cannot read MedMNIST file {path!r}: {e}") from e
    with npz:
        missing = [k for k in expected_keys if k not in npz.files]
        if missing:
            raise ValueError(
                f"MedMNIST file {path!r} lacks keys {missing}; it has {sorted(npz.files)}, expected "
                f"{expected_keys}."
            )
        splits = {}
        for npz_split, split in SPLITS.items():
            images, labels = npz[f"{npz_split}_images"], npz[f"{npz_split}_labels"]
            image_key, label_key = f"{npz_split}_images", f"{npz_split}_labels"
            shape = (
                (IMAGE_SIZE, IMAGE_SIZE) if info.channels == 1 else (IMAGE_SIZE, IMAGE_SIZE, info.channels)
            )
            if images.ndim == 4 and info.channels == 1 and images.shape[-1] == 1:
                images = images[..., 0]
            if images.dtype != np.uint8 or images.shape[1:] != shape:
                raise ValueError(
                    f"{path!r}: {image_key} is {images.dtype} {images.shape}; expected uint8 [N, "
                    f'{", ".join(map(str, shape))}] ({name} is {info.channels}-channel '
                    f"{IMAGE_SIZE}x{IMAGE_SIZE})."
                )
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"{path!r}: {label_key} is {labels.dtype} {labels.shape}; expected integers [N] or "
                    f"[N, 1] with N = {len(images)} ({image_key})."
                )
            bad = labels[(labels < 0) | (labels >= len(info.class_names))]
            if len(bad):
                raise ValueError(
                    f"{path!r}: {label_key} holds {sorted(set(bad.tolist()))[:10]}, outside 0.."
                    f"{len(info.class_names) - 1} ({len(info.class_names)} classes of {name})."
                )
            if images.ndim == 3:
                images = images[..., None]
            splits[split] = {"image": images, "label": labels.astype(np.int64)}
    return splits


class MedMnistBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder; one subclass per dataset in INFO sets `name` and `MEDMNIST_INFO`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official MedMNIST v2 28x28 splits (train / val -> validation / test)."}
    SORT_KEY = "index"  # load_split's order: the .npz order.
    MEDMNIST_INFO: Info
    # See medical_mnist.MedicalMnist.code_path (TFDS 4.9.10 cannot compute it on Python >= 3.9).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        info = self.MEDMNIST_INFO
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{info.description} From MedMNIST v2, 28x28, official splits.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, info.channels), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=info.class_names),
                    "index": tfds.features.Scalar(dtype=np.int64, doc="Position in its split of the .npz."),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://medmnist.com/",
            citation=_CITATION,
            license=info.license,
            metadata=tfds.core.MetadataDict(),
        )

    def _npz_path(self, dl_manager: tfds.download.DownloadManager) -> str:
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError as e:  # No manual dir, or it is missing or empty.
            raise ValueError(
                f"{self.name} needs a manual dir (config.data.manual_dir or $MEDJAX_MANUAL_DIR). "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            ) from e
        candidates = [os.path.join(manual_dir, "medmnist", f"{self.name}.npz")]
        candidates.append(os.path.join(manual_dir, f"{self.name}.npz"))
        for path in candidates:
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"No {self.name}.npz at {candidates}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = self._npz_path(dl_manager)
        md5 = _md5(path)
        official = md5 == self.MEDMNIST_INFO.md5
        if not official:
            logging.warning(
                "%s has MD5 %s, not the official %s: not the official release file.",
                path,
                md5,
                self.MEDMNIST_INFO.md5,
            )
        splits = read_npz(path, self.name)
        sizes = {split: len(arrays["label"]) for split, arrays in splits.items()}
        if official and sizes != self.MEDMNIST_INFO.num_examples:
            raise ValueError(
                f"{path!r}: split sizes {sizes} differ from the official {self.MEDMNIST_INFO.num_examples}."
            )
        self.info.metadata["npz_md5"] = md5
        self.info.metadata["official_md5"] = official
        return {split: self._generate_examples(arrays) for split, arrays in splits.items()}

    def _generate_examples(self, arrays):
        for i, (image, label) in enumerate(zip(arrays["image"], arrays["label"])):
            yield i, {"image": image, "label": int(label), "index": i}


def _manual_download_instructions(name: str, info: Info) -> str:
    return (
        f"Put the official MedMNIST v2 file {name}.npz (28x28; MD5 {info.md5}) at "
        f"<manual_dir>/medmnist/{name}.npz or <manual_dir>/{name}.npz. It is published in Zenodo record "
        "10519652 (https://zenodo.org/records/10519652)."
    )


def _builder_class(name: str, info: Info) -> type:
    attributes = {
        "name": name,
        "MEDMNIST_INFO": info,
        "MANUAL_DOWNLOAD_INSTRUCTIONS": _manual_download_instructions(name, info),
        "__module__": __name__,
        "__doc__": f"MedMNIST v2 {name}: {info.description}",
    }
    class_name = name[: -len("mnist")].capitalize() + "Mnist"  # pneumoniamnist -> PneumoniaMnist
    return registry.register(name)(type(class_name, (MedMnistBuilder,), attributes))


BUILDER_CLASSES = {name: _builder_class(name, info) for name, info in INFO.items()}
PneumoniaMnist = BUILDER_CLASSES["pneumoniamnist"]
BreastMnist = BUILDER_CLASSES["breastmnist"]
RetinaMnist = BUILDER_CLASSES["retinamnist"]
