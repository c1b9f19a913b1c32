r"""Images/s of the compiled train step: medjax (CPU fast path and XLA native) vs the same model in PyTorch.

Each measurement runs in its own subprocess (clean peak RSS, no shared caches), and the variants of a
model alternate within every round (order rotated each round), so a noisy machine slows them alike.
Prints one JSON object per measurement and, last, a summary: medians over rounds of images/s, peak RSS
and compile time; `ratio_vs_torch` divides those medians, `ratio_vs_torch_paired` is the median of the
same-round ratios (the fairer one when the machine's load drifts between rounds).

Variants: `medjax`, `medjax_direct` (the CPU path without Winograd convolutions) and `medjax_xla`
(flax's native ops) run with glibc's allocator and XLA:CPU tuned as medjax.main does (medjax/runtime.py);
`torch` is PyTorch as shipped; `torch_tuned` is PyTorch with the same allocator settings, which speed it
up too, so `ratio_vs_torch_tuned` compares the two on an equal footing.

  python benchmarks/train_throughput.py                                    # all models, 3 rounds
  python benchmarks/train_throughput.py --models=issue_cnn --rounds=5 --steps=10

Measure on an idle machine: PyTorch's eager CPU speed drops far more than medjax's when other processes
compete for the cores (its paper-CNN step: ~1,400 img/s idle, ~150 img/s at load 4 on 2 cores), so
ratios from a busy machine flatter medjax. A 1-minute load average above BUSY_LOAD at the start is
reported on stderr and as `busy_at_start` in the first and last JSON lines.

Needs the `bench` extra (torch) for the PyTorch variants. Synthetic uint8 64x64x1 batches, 6 classes,
Adam, batch norm and dropout in training mode, labels and pixel normalisation as in medjax's step.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NUM_CLASSES = 6
IMAGE_SHAPE = (64, 64, 1)

# name -> (config.model overrides, timed steps, warm-up steps). ResNet-18 steps are ~10 s on 2 cores.
MODELS = {
    "paper_cnn": ({}, 10, 2),
    # The conv32-pool-conv64-pool-dense net: 117,264 parameters with a 6-unit hidden layer.
    "issue_cnn": ({"features": (32, 64), "dense_features": 6}, 10, 2),
    "resnet18_imagenet": ({"name": "resnet18", "stem": "imagenet"}, 4, 1),
    "resnet18_small": ({"name": "resnet18", "stem": "small"}, 2, 1),
}
VARIANTS = ("medjax", "medjax_direct", "medjax_xla", "torch", "torch_tuned")
BUSY_LOAD = 0.5  # 1-minute load average at the start above which the machine counts as busy.


def _peak_rss_mb() -> float:
    """This process's peak RSS; VmHWM on Linux, as ru_maxrss also counts a forking parent's pages."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _synthetic_batch(batch_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
    return images, labels


def model_config(name: str, dtype: str = "float32"):
    """configs/base.py's model config with the benchmark's overrides."""
    from configs import base

    config = base.get_config()
    overrides, _, _ = MODELS[name]
    for key, value in overrides.items():
        config.model[key] = value
    config.model.dtype = dtype
    return config


def run_medjax(spec: dict) -> dict:
    import jax
    import numpy as np

    from medjax import models, runtime, steps
    from medjax.models import layers

    config = model_config(spec["model"], spec.get("dtype", "float32"))
    config.train.optimizer = "adam"
    config.train.schedule = "constant"
    model = models.create_model(config.model, NUM_CLASSES)
    tx = steps.create_optimizer(config.train, 1000)
    images, labels = _synthetic_batch(spec["batch_size"])
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    compiler_options = runtime.cpu_compiler_options(config.model.name)
    with layers.implementation(spec["implementation"]), layers.winograd_set_to(spec.get("winograd", True)):
        state = jax.jit(functools.partial(steps.init_state, model, tx, image_shape=IMAGE_SHAPE))(
            jax.random.key(0)
        )
        step = jax.jit(
            functools.partial(
                steps.train_step,
                model=model,
                tx=tx,
                dropout_key=jax.random.key(1),
                mean=config.data.mean,
                std=config.data.std,
                label_smoothing=0.0,
            ),
            donate_argnums=0,
            compiler_options=compiler_options,  # As medjax's training loop compiles its step.
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    runtime.release_free_memory()  # As medjax's training loop does after its first step.
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    assert np.isfinite(float(metrics["loss"]))
    return {
        "compile_s": compile_s,
        "step_times": times,
        "num_params": num_params,
        "compiler_options": compiler_options,
    }


def run_torch(spec: dict) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_models

    config = model_config(spec["model"])
    torch.manual_seed(0)
    if config.model.name == "paper_cnn":
        model = torch_models.PaperCNN(
            NUM_CLASSES, tuple(config.model.features), config.model.dense_features, config.model.dropout_rate
        )
    else:
        model = torch_models.ResNet18(NUM_CLASSES, stem=config.model.stem)
    memory_format = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    images, labels = _synthetic_batch(spec["batch_size"])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    labels = torch.from_numpy(labels).long()
    mean, std = config.data.mean, config.data.std

    def step():
        x = (images.float() / 255.0 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    assert np.isfinite(float(loss))
    num_params = sum(p.numel() for p in model.parameters())
    return {
        "compile_s": 0.0,
        "step_times": times,
        "num_params": num_params,
        "threads": torch.get_num_threads(),
    }


def worker(spec: dict) -> dict:
    from medjax import runtime

    # medjax.main tunes glibc's allocator, XLA and JAX's dispatch before JAX starts; `torch_tuned` gets the
    # same allocator settings.
    if spec["variant"] == "torch":
        allocator, xla_tuning, dispatch = "unchanged (PyTorch as shipped)", "not applicable", "not applicable"
    elif spec["variant"] == "torch_tuned":
        allocator, xla_tuning, dispatch = runtime.tune_allocator(), "not applicable", "not applicable"
    else:
        runtime.tune_process()
        allocator, xla_tuning, dispatch = runtime.status, runtime.xla_status, runtime.dispatch_status
    rss_start = _peak_rss_mb()
    result = run_torch(spec) if spec["variant"].startswith("torch") else run_medjax(spec)
    step_s = statistics.median(result.pop("step_times"))
    return dict(
        spec,
        **result,
        step_s=step_s,
        images_per_second=spec["batch_size"] / step_s,
        peak_rss_mb=_peak_rss_mb(),
        rss_at_start_mb=rss_start,
        allocator=allocator,
        xla_tuning=xla_tuning,
        dispatch=dispatch,
    )


def measure(spec: dict) -> dict:
    """Runs one spec in a fresh subprocess and returns its JSON result (or an error record)."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return dict(spec, error=proc.stderr[-2000:])
    return json.loads(lines[-1])


def _ratios(ips, memory, reference):
    """Each medjax variant's images/s and peak RSS over `reference`'s, per model."""
    ratios = {}
    for model in ips:
        if reference not in ips[model]:
            continue
        mine = [v for v in ips[model] if v.startswith("medjax")]
        ratios[model] = {v: ips[model][v] / ips[model][reference] for v in mine}
        ratios[model].update({f"{v}_peak_rss": memory[model][v] / memory[model][reference] for v in mine})
    return ratios


def _paired_ratios(by_model, reference):
    """Median over rounds of same-round ratios: variants of a round ran back to back, sharing the load."""
    paired = {}
    for model, by_variant in by_model.items():
        reference_by_round = {r["round"]: r["images_per_second"] for r in by_variant.get(reference, [])}
        for v, rs in by_variant.items():
            same_round = [
                r["images_per_second"] / reference_by_round[r["round"]]
                for r in rs
                if r["round"] in reference_by_round
            ]
            if v.startswith("medjax") and same_round:
                paired.setdefault(model, {})[v] = statistics.median(same_round)
    return paired


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    by_model = {}
    for r in ok:
        by_model.setdefault(r["model"], {}).setdefault(r["variant"], []).append(r)
    ips, memory, compile_s, params = {}, {}, {}, {}
    for model, by_variant in by_model.items():
        ips[model] = {
            v: statistics.median(r["images_per_second"] for r in rs) for v, rs in by_variant.items()
        }
        memory[model] = {v: statistics.median(r["peak_rss_mb"] for r in rs) for v, rs in by_variant.items()}
        compile_s[model] = {
            v: statistics.median(r["compile_s"] for r in rs)
            for v, rs in by_variant.items()
            if v.startswith("medjax")
        }
        params[model] = {v: rs[0]["num_params"] for v, rs in by_variant.items()}
    summary = {"summary": True}
    for reference in ("torch", "torch_tuned"):
        summary[f"ratio_vs_{reference}_paired"] = _paired_ratios(by_model, reference)
        summary[f"ratio_vs_{reference}"] = _ratios(ips, memory, reference)
    return {
        **summary,
        "images_per_second": ips,
        "peak_rss_mb": memory,
        "compile_s": compile_s,
        "num_params": params,
        "errors": len(results) - len(ok),
        "loadavg": os.getloadavg(),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated, from {list(MODELS)}.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {VARIANTS}.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=0, help="Timed steps per run (0: the model's default).")
    parser.add_argument("--warmup", type=int, default=-1, help="Untimed steps after compile (-1: default).")
    parser.add_argument("--dtype", default="float32", help="medjax compute dtype (float32 or bfloat16).")
    parser.add_argument("--torch_channels_last", action="store_true", help="PyTorch in NHWC memory format.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    load_start = os.getloadavg()
    busy = load_start[0] > BUSY_LOAD
    if busy:
        print(
            f"WARNING: 1-minute load average {load_start[0]:.2f} > {BUSY_LOAD}: other processes compete for "
            "the CPU, which slows PyTorch far more than medjax; the ratios will flatter medjax.",
            file=sys.stderr,
            flush=True,
        )
    print(
        json.dumps({"loadavg_start": load_start, "cpu_count": os.cpu_count(), "busy_at_start": busy}),
        flush=True,
    )
    variants = args.variants.split(",")
    results = []
    for r in range(args.rounds):
        for name in args.models.split(","):
            _, steps, warmup = MODELS[name]
            # Rotate the order every round so that no variant always runs first (or after the same one).
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                spec = {
                    "model": name,
                    "variant": variant,
                    "implementation": {"medjax": "auto", "medjax_direct": "auto", "medjax_xla": "xla"}.get(
                        variant
                    ),
                    # medjax's Winograd convolutions: only in its default CPU path (null for PyTorch).
                    "winograd": variant == "medjax" if variant.startswith("medjax") else None,
                    "batch_size": args.batch_size,
                    "steps": args.steps or steps,
                    "warmup": warmup if args.warmup < 0 else args.warmup,
                    "dtype": args.dtype,
                    "channels_last": args.torch_channels_last,
                    "round": r,
                }
                result = measure(spec)
                result["loadavg"] = os.getloadavg()
                results.append(result)
                print(json.dumps(result), flush=True)
    print(json.dumps({**summarize(results), "busy_at_start": busy}), flush=True)


if __name__ == "__main__":
    main()
