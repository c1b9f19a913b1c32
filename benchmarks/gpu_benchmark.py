r"""One short accelerator benchmark: ResNet-18 at 64x64 in bfloat16, images/s and MFU of the train step.

  python benchmarks/gpu_benchmark.py                        # synthetic data, batch 1024, ~2-4 min
  python benchmarks/gpu_benchmark.py --manual_dir=DIR       # also time-to-99.9% on real Medical MNIST
  python benchmarks/gpu_benchmark.py --smoke                # tiny CPU check of this script

Nothing is downloaded. The train step is medjax's (Adam, batch norm, bf16 compute with f32 params,
`config.model.dtype='bfloat16'`), jitted over all local devices with the batch sharded. FLOPs per step
are XLA's own count for the compiled step (`cost_analysis()`), so MFU = FLOPs / step time / peak, with
the peak dense bf16 FLOP/s of the device kind from PEAK_TFLOPS below (override: --peak_tflops).
Prints one JSON object per measurement and, last, a JSON summary.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Dense (no sparsity) bf16 peak TFLOP/s per device, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L4": 121.0,
    "A10G": 70.0,
    "V100": 125.0,  # fp16 tensor cores (no bf16).
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str):
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # Most specific first ("H100 PCIe").
        if name.lower() in device_kind.lower():
            return PEAK_TFLOPS[name]
    return None


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="Timed steps (median step time).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--stem", default="imagenet", help="ResNet stem: 'imagenet' or 'small'.")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="Per-device peak, overrides the table."
    )
    parser.add_argument("--manual_dir", default=None, help="Medical MNIST source: also time to 99.9%%.")
    parser.add_argument("--tfds_dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="Tiny run for checking the script on CPU.")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.steps, args.warmup = 8, 2, 1

    import jax
    import numpy as np

    from configs import resnet18
    from medjax import models, sharding, steps

    devices = jax.devices()
    kind = devices[0].device_kind
    print(
        json.dumps({"backend": jax.default_backend(), "device_kind": kind, "devices": len(devices)}),
        flush=True,
    )

    config = resnet18.get_config()
    config.model.name = "resnet18"
    config.model.stem = args.stem
    config.model.dtype = args.dtype
    config.train.optimizer = "adam"
    config.train.schedule = "constant"
    sharding.check_batch_size(args.batch_size, "--batch_size")
    mesh = sharding.create_mesh()
    model = models.create_model(config.model, 6)
    tx = steps.create_optimizer(config.train, 1000)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (args.batch_size, 64, 64, 1), dtype=np.uint8),
        "label": rng.integers(0, 6, args.batch_size).astype(np.int32),
    }
    batch = sharding.to_global(batch, mesh)
    replicated = sharding.replicated(mesh)
    state = jax.jit(
        functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 1)), out_shardings=replicated
    )(jax.random.key(0))
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
        in_shardings=(replicated, sharding.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = args.peak_tflops or peak_tflops(kind)
    summary = {
        "summary": True,
        "model": f"resnet18 ({args.stem} stem), 64x64x1, {args.dtype}",
        "device_kind": kind,
        "devices": len(devices),
        "batch_size": args.batch_size,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "images_per_second": args.batch_size / step_s,
        "xla_flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops_per_device_assumed": peak,
        "mfu": flops / step_s / (peak * 1e12 * len(devices)) if peak and flops else None,
        "loss": float(metrics["loss"]),
    }
    if args.manual_dir:
        command = [
            sys.executable,
            os.path.join(REPO, "benchmarks", "time_to_accuracy.py"),
            "--config=" + os.path.join(REPO, "configs", "fast.py"),
            "--config.model.name=resnet18",
            f"--config.model.stem={args.stem}",
            f"--config.model.dtype={args.dtype}",
            f"--config.data.manual_dir={args.manual_dir}",
        ]
        if args.tfds_dir:
            command.append(f"--config.data.tfds_dir={args.tfds_dir}")
        if args.smoke:
            command += ["--config.train.num_epochs=0.01", "--config.train.eval_every_steps=2"]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"summary"')]
        summary["time_to_accuracy"] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
