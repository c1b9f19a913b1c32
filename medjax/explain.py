"""Explanations of a prediction as heat maps over the input image: Grad-CAM and occlusion sensitivity.

* Grad-CAM (Selvaraju et al., 2017): the activations A of the model's last convolutional stage, weighted
  per channel by the spatial mean of d(top-class logit)/dA, summed over channels, ReLU. The stage is found
  for any flax model without changing it: every module call is intercepted (`flax.linen.intercept_methods`)
  in an abstract forward pass, and the stage is the last call to return a 4-D [N, H, W, C] array (the
  input of global pooling or flatten). Its gradient is taken by adding a zero tensor to that output.
* Occlusion sensitivity (Zeiler & Fergus, 2014), model-agnostic: a square patch of the normalised zero
  (pixel value round(mean * 255)) slides over the image; each pixel's score is the mean drop of the top
  class's probability over the patches covering it.

Both maps are [H, W] at the stored image size, scaled to 0..1 (by their maximum; negatives clipped).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medjax import steps


def _calls(model: nn.Module, variables: dict, input_shape) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(module path, output shape) of every module __call__ of a forward pass, in the order they return."""
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(out, jax.Array):
            calls.append((tuple(context.module.path), tuple(out.shape)))
        return out

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return calls


def last_conv_stage(model: nn.Module, variables: dict, input_shape) -> tuple[tuple[str, ...], int]:
    """(path, index among that module's calls) of the last module call returning a 4-D array; ValueError
    if the model has none."""
    calls = _calls(model, variables, input_shape)
    for i in range(len(calls) - 1, -1, -1):
        path, shape = calls[i]
        if len(shape) == 4 and path:
            return path, sum(1 for p, _ in calls[:i] if p == path)
    raise ValueError(f"{type(model).__name__} has no module returning a 4-D (NHWC) activation.")


def _normalise(maps: jnp.ndarray) -> jnp.ndarray:
    maps = jnp.maximum(maps, 0.0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def _grad_cam(variables, images, classes, *, model, stage, activation_shape, preprocessing):
    path, index = stage
    x = steps.preprocess(images, **preprocessing)

    def top_logit(delta):
        seen = []

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == path:
                seen.append(out)
                if len(seen) == index + 1:
                    return out + delta
            return out

        with nn.intercept_methods(perturb):
            logits = model.apply(variables, x, train=False)
        top = jnp.where(classes >= 0, classes, jax.lax.stop_gradient(jnp.argmax(logits, axis=-1)))
        score = jnp.take_along_axis(logits, top[:, None], axis=-1).sum()
        return score, (seen[index], top)

    delta = jnp.zeros((images.shape[0], *activation_shape[1:]), jnp.float32)
    grads, (activations, top) = jax.grad(top_logit, has_aux=True)(delta)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = (weights * activations.astype(jnp.float32)).sum(axis=-1)
    cams = jax.image.resize(cams, (cams.shape[0], *images.shape[1:3]), "bilinear")
    return _normalise(cams), top


class GradCam:
    """Grad-CAM maps of uint8 [N, H, W, C] images (as stored), jitted once per batch shape."""

    def __init__(self, model: nn.Module, variables: dict, image_shape, preprocessing: dict):
        self.preprocessing = {k: preprocessing.get(k, 0) for k in ("mean", "std", "image_size", "channels")}
        input_shape = steps.model_input_shape(
            image_shape, self.preprocessing["image_size"], self.preprocessing["channels"]
        )
        self.stage = last_conv_stage(model, variables, input_shape)
        shapes = [shape for p, shape in _calls(model, variables, input_shape) if p == self.stage[0]]
        self.activation_shape = shapes[self.stage[1]]
        self._variables = variables
        self._fn = jax.jit(
            functools.partial(
                _grad_cam,
                model=model,
                stage=self.stage,
                activation_shape=self.activation_shape,
                preprocessing=self.preprocessing,
            )
        )

    def __call__(
        self, images: np.ndarray, batch_size: int, classes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(maps [N, H, W] in 0..1, class [N]) for `classes` (default: the model's top class), in padded
        batches of `batch_size`."""
        if classes is None:
            classes = np.full(len(images), -1, np.int32)
        maps, tops = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            padded = np.zeros((batch_size, *images.shape[1:]), images.dtype)
            padded[: len(chunk)] = chunk
            targets = np.full(batch_size, -1, np.int32)
            targets[: len(chunk)] = classes[start : start + batch_size]
            m, t = self._fn(self._variables, padded, targets)
            maps.append(np.asarray(m)[: len(chunk)])
            tops.append(np.asarray(t)[: len(chunk)])
        return np.concatenate(maps), np.concatenate(tops)


def occlusion(
    probabilities, image: np.ndarray, class_index: int, *, mean: float, patch: int = 0, stride: int = 0
) -> np.ndarray:
    """Occlusion-sensitivity map [H, W] in 0..1 of one uint8 [H, W, C] image for `class_index`.

    `probabilities(images) -> [N, num_classes]` runs the model on uint8 images; `patch` defaults to an
    eighth of the shorter side, `stride` to half the patch.
    """
    height, width = image.shape[:2]
    patch = patch or max(1, round(min(height, width) / 8))
    stride = stride or max(1, patch // 2)
    fill = np.uint8(round(mean * 255))
    tops = list(range(0, max(height - patch, 0) + 1, stride))
    lefts = list(range(0, max(width - patch, 0) + 1, stride))
    if tops[-1] + patch < height:
        tops.append(height - patch)
    if lefts[-1] + patch < width:
        lefts.append(width - patch)
    boxes = [(t, l) for t in tops for l in lefts]
    variants = np.repeat(image[None], len(boxes) + 1, axis=0)
    for i, (t, l) in enumerate(boxes, start=1):
        variants[i, t : t + patch, l : l + patch] = fill
    p = np.asarray(probabilities(variants))[:, class_index]
    drops = p[0] - p[1:]
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for drop, (t, l) in zip(drops, boxes):
        total[t : t + patch, l : l + patch] += drop
        count[t : t + patch, l : l + patch] += 1
    return np.asarray(_normalise(jnp.asarray(total / np.maximum(count, 1))[None]))[0]


def _colormap(heat: np.ndarray) -> np.ndarray:
    """A jet-like colour map: 0..1 -> uint8 RGB (blue, cyan, yellow, red)."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return (np.concatenate([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, min_size: int = 256, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB: the gray or RGB `image` [H, W, C] blended with the coloured `heat` [H, W], enlarged by a
    whole factor (nearest) to at least `min_size` pixels on the longer side."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    blended = (1 - alpha) * rgb.astype(np.float64) + alpha * _colormap(heat).astype(np.float64)
    factor = max(1, -(-min_size // max(image.shape[:2])))
    blended = np.repeat(np.repeat(blended, factor, axis=0), factor, axis=1)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_overlay(path: str, image: np.ndarray, heat: np.ndarray) -> None:
    Image.fromarray(overlay(image, heat)).save(path)
