"""Train state, optimizer and the pure train/eval step functions that get jit-compiled over the mesh."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; the module and optimizer are rebuilt from the config."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any


def normalize(images: jnp.ndarray, mean: float, std: float) -> jnp.ndarray:
    """uint8 pixels -> float32 (x / 255 - mean) / std; the recipe is saved with every checkpoint."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def preprocessing(data_config: ml_collections.ConfigDict) -> dict:
    """The step's input recipe from `config.data`: keyword arguments of `preprocess`."""
    return {
        "mean": data_config.mean,
        "std": data_config.std,
        "image_size": data_config.get("image_size", 0),
        "channels": data_config.get("channels", 0),
    }


def model_input_shape(image_shape, image_size: int = 0, channels: int = 0) -> tuple[int, int, int]:
    """The [H, W, C] the model sees once `preprocess` has resized and converted [H, W, C] images."""
    height, width, depth = image_shape
    if image_size:
        height = width = image_size
    return (height, width, channels or depth)


def preprocess(
    images: jnp.ndarray, *, mean: float, std: float, image_size: int = 0, channels: int = 0
) -> jnp.ndarray:
    """uint8 [N, H, W, C] pixels -> the model's float32 input.

    `channels` (0: as stored) converts grayscale to RGB by repeating the channel and RGB to grayscale by
    averaging the channels; `image_size` (0: as stored) resizes bilinearly (antialiased when shrinking)
    to image_size x image_size; then pixels are normalized as (x / 255 - mean) / std.
    """
    x = images.astype(jnp.float32)
    depth = x.shape[-1]
    if channels and channels != depth and depth != 1 and channels != 1:
        raise ValueError(f"Cannot convert {depth}-channel images to channels={channels}; only 1 <-> C.")
    if channels == 1 and depth != 1:
        x = jnp.mean(x, axis=-1, keepdims=True)
    if image_size and x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
    if channels and depth == 1 and channels != 1:
        x = jnp.repeat(x, channels, axis=-1)
    return normalize(x, mean, std)


def learning_rate_schedule(train_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr, warmup = train_config.learning_rate, min(train_config.warmup_steps, total_steps)
    if train_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    if train_config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(f"Unknown config.train.schedule={train_config.schedule!r}; known: 'cosine', 'constant'")


def _decay_mask(params):
    """Weight decay on kernels only, not on biases or batch-norm scales."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def create_optimizer(
    train_config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_config, total_steps)
    name = train_config.optimizer
    if name == "adam":
        return optax.adam(schedule)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=train_config.weight_decay, mask=_decay_mask)
    if name == "sgd":
        return optax.sgd(schedule, momentum=train_config.get("momentum", 0.9), nesterov=True)
    raise ValueError(f"Unknown config.train.optimizer={name!r}; known: 'adam', 'adamw', 'sgd'")


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    image_shape,
    image_size: int = 0,
    channels: int = 0,
) -> TrainState:
    """A fresh state for `image_shape` images (as stored; see `preprocess` for image_size/channels)."""
    shape = model_input_shape(image_shape, image_size, channels)
    variables = model.init({"params": key}, jnp.zeros((1,) + shape, jnp.uint8), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    dropout_key: jax.Array,
    mean: float,
    std: float,
    label_smoothing: float,
    image_size: int = 0,
    channels: int = 0,
) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch. Batch-norm statistics are over the whole global batch."""
    images = preprocess(batch["image"], mean=mean, std=std, image_size=image_size, channels=channels)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(dropout_key, state.step)},
        )
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def batch_statistics(
    params: Any,
    batch_stats: Any,
    images: jnp.ndarray,
    *,
    model: nn.Module,
    mean: float,
    std: float,
    image_size: int = 0,
    channels: int = 0,
) -> Any:
    """Batch-norm statistics of one (global) batch; `model` must be built with bn_momentum=0."""
    _, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        preprocess(images, mean=mean, std=std, image_size=image_size, channels=channels),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},
    )
    return updates["batch_stats"]


def eval_step(
    variables: dict,
    images: jnp.ndarray,
    *,
    model: nn.Module,
    mean: float,
    std: float,
    image_size: int = 0,
    channels: int = 0,
) -> jnp.ndarray:
    """Class probabilities in inference mode (running batch-norm statistics, no dropout)."""
    images = preprocess(images, mean=mean, std=std, image_size=image_size, channels=channels)
    logits = model.apply(variables, images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
