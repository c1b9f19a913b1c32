"""Model registry: builds a flax.linen module from `config.model`.

`config.model` holds `name` (a key of MODELS) and the model's own constructor fields, nothing else;
`dtype` is written as a string. Layer types (`conv`, `norm`, ResNet's `max_pool`, the paper CNN's
`block`) are not configuration: callers pass drop-in replacements to `create_model` as keywords.
"""

import dataclasses
import functools

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from medjax.models.alexnet import ALEXNET, ZFNET, AlexNet
from medjax.models.densenet import DenseNet
from medjax.models.efficientnet import LITE0_STAGES, EfficientNetLite
from medjax.models.googlenet import GoogLeNet
from medjax.models.lenet import LeNet5
from medjax.models.paper_cnn import ConvBlock, PaperCNN
from medjax.models.resnet import BasicBlock, Bottleneck, ResNet
from medjax.models.vgg import VGG, VGG11, VGG16

MODELS = {
    "paper_cnn": PaperCNN,
    "lenet5": LeNet5,
    "alexnet": functools.partial(AlexNet, convs=ALEXNET),
    "zfnet": functools.partial(AlexNet, convs=ZFNET),
    "vgg11": functools.partial(VGG, layout=VGG11),
    "vgg16": functools.partial(VGG, layout=VGG16),
    "googlenet": GoogLeNet,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
    "densenet121": functools.partial(DenseNet, block_sizes=(6, 12, 24, 16), growth_rate=32, init_features=64),
    "efficientnet_lite0": functools.partial(EfficientNetLite, stages=LITE0_STAGES),
}
# Fields that take a layer type (passed to create_model as keywords, never set in config.model).
LAYER_FIELDS = ("conv", "norm", "max_pool", "block")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fields(name: str) -> set[str]:
    """Constructor fields of MODELS[name] that its registry entry leaves open (num_classes aside)."""
    entry = MODELS[name]
    cls, fixed = (entry.func, entry.keywords) if isinstance(entry, functools.partial) else (entry, {})
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return fields - {"parent", "name", "num_classes"} - set(fixed)


def config_fields(name: str) -> tuple[str, ...]:
    """The fields that `config.model` may set for model `name`, besides `name` itself."""
    return tuple(sorted(_fields(name) - set(LAYER_FIELDS)))


def layer_fields(name: str) -> tuple[str, ...]:
    """The layer-type fields of model `name` (what `create_model` takes as keywords)."""
    return tuple(sorted(_fields(name) & set(LAYER_FIELDS)))


def _as_tuples(value):
    """Lists (from a JSON round trip of a config) as tuples, so that module fields stay hashable."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def create_model(model_config: ml_collections.ConfigDict, num_classes: int, **layers) -> nn.Module:
    """MODELS[model_config.name](num_classes=..., **the other fields of model_config, **layers).

    An unknown model name, config field, dtype or layer keyword is a ValueError naming it.
    """
    fields = dict(model_config.items())
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"Unknown config.model.name={name!r}; known: {sorted(MODELS)}")
    unknown = sorted(set(fields) - set(config_fields(name)))
    if unknown:
        raise ValueError(
            f"Unknown config.model field(s) {', '.join(unknown)} for model {name!r}; its fields: "
            f"{', '.join(config_fields(name))}"
        )
    unknown = sorted(set(layers) - set(layer_fields(name)))
    if unknown:
        raise ValueError(
            f"Model {name!r} has no layer field(s) {', '.join(unknown)}; its layer fields: "
            f"{', '.join(layer_fields(name)) or 'none'}"
        )
    if "dtype" in fields:
        if fields["dtype"] not in DTYPES:
            raise ValueError(f"Unknown config.model.dtype={fields['dtype']!r}; known: {sorted(DTYPES)}")
        fields["dtype"] = DTYPES[fields["dtype"]]
    fields = {key: _as_tuples(value) for key, value in fields.items()}
    return MODELS[name](num_classes=num_classes, **fields, **layers)


__all__ = [
    "MODELS",
    "LAYER_FIELDS",
    "DTYPES",
    "BasicBlock",
    "Bottleneck",
    "ConvBlock",
    "config_fields",
    "create_model",
    "layer_fields",
]
