r"""What each piece of medjax.cpu gives: train-step speed and peak RSS with the piece off vs all pieces on.

For the paper CNN (configs/base.py) and ResNet-18 with the 7x7 'imagenet' stem (64x64x1, batch 128), one
worker process runs the train step with every piece on (config.ops='cpu'), and one more at a time runs it
with one piece off (config.cpu.<piece>=False) or with flax's layers (config.ops='flax'). The two take
turns, a block of steps each, for --rounds rounds, so both meet the same machine state; a piece's speed-up
is the median over rounds of (step time with it off) / (step time all on). A piece whose step compiles to
the same program as all-on (it does not apply to the model) is reported as '-' without timing.

Prints one JSON line per variant and, last, the table (piece | lines | paper-CNN speed-up | ResNet-18
(7x7) speed-up | peak RSS change). Run it on an idle machine; about 6-10 minutes on 2 cores:

  python benchmarks/cpu_ablation.py [--rounds=5] [--models=paper_cnn,resnet18]
"""

import argparse
import hashlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NUM_CLASSES = 6
BATCH = 128
# model (its configs/<model>.py) -> (config.model overrides, timed steps per block, warm-up steps).
MODELS = {"paper_cnn": ({}, 10, 3), "resnet18": ({"stem": "imagenet"}, 3, 2)}


def piece_lines() -> dict:
    """Lines of medjax/cpu that exist for each piece (its functions, classes and C++ files)."""
    from medjax import cpu
    from medjax.cpu import block, conv, native, pool

    def lines(*objects, files=()):
        total = sum(len(inspect.getsourcelines(o)[0]) for o in objects)
        for name in files:
            with open(os.path.join(os.path.dirname(native.__file__), name)) as f:
                total += len(f.readlines())
        return total

    return {
        "compiler_options": lines(cpu.compiler_options, cpu._has_avx512),
        "malloc": lines(cpu.tune_process),
        "huge_pages": lines(cpu._huge_page_heap),
        "small_patches": lines(conv._patches_conv),
        "max_pool": lines(
            pool._forward, pool._backward, pool.max_pool, pool._max_pool_fwd, pool._max_pool_bwd
        ),
        "pool_first": lines(block._PooledBatchNorm),
        "fused_block": lines(
            block._conv_pool_moments,
            block._conv_pool_moments_fwd,
            block._conv_pool_moments_bwd,
            native.conv_bn_pool,
            native.conv_bn_pool_kernel_grad,
            native.supports_conv_bn_pool,
            files=("conv_bn_pool.cc",),
        ),
    }


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def _config(model: str, variant: str):
    import importlib

    config = importlib.import_module(f"configs.{model}").get_config()
    for key, value in MODELS[model][0].items():
        config.model[key] = value
    config.train.optimizer, config.train.schedule = "adam", "constant"
    if variant == "flax":
        config.ops = "flax"
    else:
        config.ops = "cpu"
        if variant != "all":
            config.cpu[variant] = False
    return config


def serve(model: str, variant: str) -> None:
    """A worker: compiles one variant's train step, then times blocks of steps on request."""
    from medjax import ops

    config = _config(model, variant)
    process = ops.tune_process(config)  # Before JAX's backend starts, as medjax.main does.
    import functools

    import jax
    import numpy as np

    from medjax import steps

    chosen = ops.resolve(config)
    net = chosen.create_model(config.model, NUM_CLASSES)
    tx = steps.create_optimizer(config.train, 1000)
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.integers(0, 256, (BATCH, 64, 64, 1), dtype=np.uint8)),
        "label": jax.device_put(rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)),
    }
    state = jax.jit(functools.partial(steps.init_state, net, tx, image_shape=(64, 64, 1)))(jax.random.key(0))
    step_fn = jax.jit(
        functools.partial(
            steps.train_step,
            model=net,
            tx=tx,
            dropout_key=jax.random.key(1),
            mean=0.5,
            std=0.25,
            label_smoothing=0.0,
        ),
        donate_argnums=0,
        compiler_options=chosen.compiler_options(config.model.name),
    )
    lowered = step_fn.lower(state, batch)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The program's identity: its optimized HLO, plus the process settings that the HLO does not show.
    text = compiled.as_text() + (process if variant in ("malloc", "huge_pages") else "")
    holder = [state]

    def run(n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            holder[0], metrics = compiled(holder[0], batch)
            jax.block_until_ready(holder[0])
            times.append(time.perf_counter() - t)
        return times

    run(MODELS[model][2])
    info = {
        "compile_s": compile_s,
        "program": hashlib.sha256(text.encode()).hexdigest()[:12],
        "ops": chosen.describe(),
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "steps" not in request:
            break
        print(json.dumps({"times": run(request["steps"])}), flush=True)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)


class Worker:
    def __init__(self, model: str, variant: str):
        self.variant = variant
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), f"--worker={model}:{variant}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        self.info = self._receive()

    def _receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.variant} exited with status {self.proc.wait()}")

    def time_steps(self, n: int) -> float:
        self.proc.stdin.write(json.dumps({"steps": n}) + "\n")
        self.proc.stdin.flush()
        return statistics.median(self._receive()["times"])

    def stop(self) -> float:
        self.proc.stdin.write("{}\n")
        self.proc.stdin.close()
        rss = self._receive()["peak_rss_mb"]
        self.proc.wait()
        return rss


def measure(model: str, variants: list, rounds: int) -> dict:
    """variant -> {speedup (median of paired step-time ratios, off / all-on), rss_mb, ...}."""
    steps = MODELS[model][1]
    reference = Worker(model, "all")
    results = {}
    for variant in variants:
        other = Worker(model, variant)
        if other.info["program"] == reference.info["program"]:
            other.stop()
            results[variant] = {"speedup": None, "rss_mb": None, "note": "same program as all on"}
            print(json.dumps({"model": model, "variant": variant, **results[variant]}), flush=True)
            continue
        ratios = []
        for r in range(rounds):
            pair = (reference, other) if r % 2 == 0 else (other, reference)
            times = {w.variant: w.time_steps(steps) for w in pair}
            ratios.append(times[variant] / times["all"])
        results[variant] = {"speedup": statistics.median(ratios), "ratios": ratios, "rss_mb": other.stop()}
        print(json.dumps({"model": model, "variant": variant, **results[variant]}), flush=True)
    results["all"] = {"rss_mb": reference.stop()}
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--pieces", default="", help="Comma-separated pieces (default: all, then flax).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(*args.worker.split(":"))
        return
    from medjax import cpu

    lines = piece_lines()
    package = os.path.dirname(cpu.__file__)
    total = sum(
        len(open(os.path.join(d, f)).readlines())
        for d, _, names in os.walk(package)
        for f in names
        if f.endswith((".py", ".cc", ".h"))
    )
    variants = args.pieces.split(",") if args.pieces else list(cpu.Options._fields) + ["flax"]
    start = time.time()
    print(json.dumps({"loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count()}), flush=True)
    by_model = {model: measure(model, variants, args.rounds) for model in args.models.split(",")}

    def cell(result):
        return "-" if result["speedup"] is None else f"{result['speedup']:.3f}x"

    print(
        "\npiece | lines | paper-CNN speed-up | ResNet-18 (7x7) speed-up | peak RSS change (paper / ResNet)"
    )
    print("---|---:|---:|---:|---")
    for variant in variants:
        cells, rss = [], []
        for model in MODELS:
            result = by_model.get(model, {}).get(variant)
            cells.append("n/a" if result is None else cell(result))
            if result is not None and result["rss_mb"] is not None:
                rss.append(f"{by_model[model]['all']['rss_mb'] - result['rss_mb']:+.0f} MiB")
        name = "all of medjax.cpu (vs flax)" if variant == "flax" else variant
        print(f"{name} | {lines.get(variant, total)} | {cells[0]} | {cells[1]} | {' / '.join(rss) or '-'}")
    print(
        f"\n(speed-up: step time with the piece off / all on, median of {args.rounds} paired blocks; RSS: all on"
    )
    print(f"minus piece off; {time.time() - start:.0f}s, load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
