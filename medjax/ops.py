"""Which layers a model runs with: flax's own, or medjax.cpu's drop-ins for XLA:CPU.

`config.ops` is 'flax', 'cpu' or 'auto' (cpu on the CPU backend, flax elsewhere). medjax.cpu is imported
only when the answer is 'cpu'; its pieces are switched by `config.cpu` (see medjax.cpu.Options).
Training, batch-norm calibration and medjax.evaluate all build their models through `Ops`.
"""

import dataclasses
import importlib.util
import os
from typing import Any, Optional

import jax
import ml_collections

from medjax import models

CHOICES = ("auto", "flax", "cpu")
# Packages whose presence means JAX may start on a GPU or TPU (jax_plugins: any PJRT plugin).
_ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


@dataclasses.dataclass(frozen=True)
class Ops:
    """The resolved choice: `name` ('flax' or 'cpu'), `reason`, and medjax.cpu's Options for 'cpu'."""

    name: str
    reason: str
    cpu_options: Any = None

    def create_model(self, model_config: ml_collections.ConfigDict, num_classes: int):
        """models.create_model with this choice's layers."""
        if self.name == "flax":
            return models.create_model(model_config, num_classes)
        from medjax import cpu

        overrides = cpu.layer_overrides(model_config.name, self.cpu_options)
        return models.create_model(model_config, num_classes, **overrides)

    def compiler_options(self, model_name: str) -> Optional[dict]:
        """XLA options for jax.jit of the model's steps (None: XLA's defaults)."""
        if self.name == "flax":
            return None
        from medjax import cpu

        return cpu.compiler_options(model_name, self.cpu_options) or None

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.name == "flax":
            return f"flax ops ({self.reason})"
        from medjax import cpu

        off = [name for name, on in self.cpu_options._asdict().items() if not on]
        pieces = f"pieces off: {', '.join(off)}" if off else "all pieces on"
        return f"medjax.cpu ops ({self.reason}; {pieces}; {cpu.status()})"


def _choice(config: ml_collections.ConfigDict) -> str:
    name = config.get("ops", "auto")
    if name not in CHOICES:
        raise ValueError(f"Unknown config.ops={name!r}; known: {CHOICES}")
    return name


def resolve(config: ml_collections.ConfigDict, backend: Optional[str] = None) -> Ops:
    """Resolves `config.ops` ('auto' asks JAX for its default backend unless `backend` is given)."""
    name = _choice(config)
    if name == "auto":
        backend = backend or jax.default_backend()
        name, reason = ("cpu" if backend == "cpu" else "flax"), f"config.ops='auto' on the {backend} backend"
    else:
        reason = f"config.ops={name!r}"
    if name == "flax":
        return Ops("flax", reason)
    from medjax import cpu

    return Ops("cpu", reason, cpu.Options.from_config(config.get("cpu")))


def _cpu_only_host() -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend: JAX_PLATFORMS (or
    jax.config.jax_platforms) if set, else whether no GPU/TPU plugin is installed."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def tune_process(config: ml_collections.ConfigDict) -> str:
    """Process settings for the CPU ops (medjax.cpu.tune_process: glibc's allocator); call it from main()
    before anything starts a JAX backend. Does nothing when `config.ops` is 'flax', or 'auto' on a host
    with a GPU/TPU plugin; `config.cpu.malloc=False` turns it off. Returns what was done."""
    name = _choice(config)
    if name == "flax" or (name == "auto" and not _cpu_only_host()):
        return f"process settings unchanged (config.ops={name!r}, not the CPU ops)"
    from medjax import cpu

    return cpu.tune_process(cpu.Options.from_config(config.get("cpu")))
