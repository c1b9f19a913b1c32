r"""Images/s of the compiled train step: medjax (medjax.cpu's ops and flax's) vs the same model in PyTorch.

Every variant runs in its own worker process (clean peak RSS, no shared caches). In each round a model's
workers start one after another (compiling and warming up alone), then stay alive and take turns running
`--blocks` blocks of timed steps (order rotated every block; round start order rotated every round), so
the variants of a block meet the same machine state within about a second. Before each block the
benchmark measures the round trip of a value between the two first cores (`core_round_trip_ns`): a VM's
host may move its vCPUs between near (~150 ns) and far (~380 ns) core pairs for seconds to minutes, which
slows medjax's step more than PyTorch's, so the results are also given per placement.
A model's workers are resident together: the machine needs the sum of their peak RSS.

Prints one JSON object per measurement (variant and round) and, last, a summary: medians over rounds of
images/s (each round's from its median step time), peak RSS and compile time; `ratio_vs_torch` divides
those medians, `ratio_vs_torch_paired` is the median of the same-block ratios over all blocks of all
rounds (the fairer one on a noisy machine), and `ratio_vs_torch_paired_by_cores` splits those blocks by
the core placement measured before them (`core_round_trip_ns` below or above NEAR_ROUND_TRIP_NS).

Variants: `medjax` (config.ops='cpu': medjax.cpu's drop-ins, compiler options and process settings, as
medjax.main runs on a CPU) and `medjax_flax` (config.ops='flax'); `torch` is PyTorch as shipped;
`torch_tuned` is PyTorch with medjax.cpu's allocator setting, which speeds it up too, so
`ratio_vs_torch_tuned` compares the two on an equal footing.

  python benchmarks/train_throughput.py                                    # all models, 3 rounds x 3 blocks
  python benchmarks/train_throughput.py --models=paper_cnn --rounds=5 --steps=10

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
import math
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NUM_CLASSES = 6
IMAGE_SHAPE = (64, 64, 1)

# name -> (configs/<module>.py, config.model overrides, timed steps, warm-up steps).
MODELS = {
    "paper_cnn": ("paper_cnn", {}, 10, 2),
    # A conv32-pool-conv64-pool-dense net: 117,264 parameters, a 6-unit hidden layer.
    "conv32_64_cnn": ("paper_cnn", {"features": (32, 64), "dense_features": 6}, 10, 2),
    "resnet18_imagenet": ("resnet18", {"stem": "imagenet"}, 4, 1),
    "resnet18_small": ("resnet18", {"stem": "small"}, 2, 1),
}
VARIANTS = ("medjax", "medjax_flax", "torch", "torch_tuned")
BUSY_LOAD = 0.5  # 1-minute load average at the start above which the machine counts as busy.
# Core round trips below this count as the two cores' near placement (see core_round_trip_ns; this
# machine's are ~150 ns near, ~380 ns far).
NEAR_ROUND_TRIP_NS = 250.0
# Pause before each worker's block, so that the previous worker's threads have stopped spinning.
HANDOFF_PAUSE_S = 0.05


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


def model_config(name: str, dtype: str = "float32", ops: str = "cpu"):
    """The model's config (configs/<module>.py) with the benchmark's overrides."""
    import importlib

    module, overrides, _, _ = MODELS[name]
    config = importlib.import_module(f"configs.{module}").get_config()
    config.ops = ops
    for key, value in overrides.items():
        config.model[key] = value
    config.model.dtype = dtype
    return config


def prepare_medjax(spec: dict):
    """Compiles medjax's train step and runs the warm-up steps; returns (step, info): step() runs one step
    to completion and returns its loss."""
    import jax
    import numpy as np

    from medjax import ops, steps

    config = model_config(spec["model"], spec.get("dtype", "float32"), spec["ops"])
    config.train.optimizer = "adam"
    config.train.schedule = "constant"
    chosen_ops = ops.resolve(config)
    model = chosen_ops.create_model(config.model, NUM_CLASSES)
    tx = steps.create_optimizer(config.train, 1000)
    images, labels = _synthetic_batch(spec["batch_size"])
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    compiler_options = chosen_ops.compiler_options(config.model.name)
    state = jax.jit(functools.partial(steps.init_state, model, tx, image_shape=IMAGE_SHAPE))(
        jax.random.key(0)
    )
    train_step = jax.jit(
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
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(holder["state"])
        return metrics["loss"]

    for _ in range(spec["warmup"]):
        step()
    info = {
        "compile_s": compile_s,
        "num_params": num_params,
        "compiler_options": compiler_options,
        "ops": chosen_ops.describe(),
    }
    return step, info


def prepare_torch(spec: dict):
    """The PyTorch twin of `prepare_medjax` (eager mode: nothing to compile)."""
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
        return loss.detach()

    for _ in range(spec["warmup"]):
        step()
    num_params = sum(p.numel() for p in model.parameters())
    return step, {"compile_s": 0.0, "num_params": num_params, "threads": torch.get_num_threads()}


def _send(message: dict) -> None:
    print(json.dumps(message), flush=True)


def serve(spec: dict) -> None:
    """A worker process: prepares one variant, says it is ready, then times blocks of steps on request
    ({"steps": n} -> {"step_times": [...]}) until {"stop": true}, which it answers with its peak RSS."""
    from medjax import ops

    # medjax.main makes the ops' process settings before JAX starts; `torch_tuned` gets medjax.cpu's.
    if spec["variant"] == "torch":
        process_settings = "unchanged (PyTorch as shipped)"
    elif spec["variant"] == "torch_tuned":
        from medjax import cpu

        process_settings = cpu.tune_process()
    else:
        process_settings = ops.tune_process(model_config(spec["model"], ops=spec["ops"]))
    rss_at_start = _peak_rss_mb()
    step, info = (prepare_torch if spec["variant"].startswith("torch") else prepare_medjax)(spec)
    _send(
        dict(
            info,
            ready=True,
            process_settings=process_settings,
            rss_at_start_mb=rss_at_start,
        )
    )
    loss = None
    for line in sys.stdin:
        request = json.loads(line)
        if "steps" not in request:
            break
        times = []
        for _ in range(request["steps"]):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        _send({"step_times": times})
    _send(
        {"peak_rss_mb": _peak_rss_mb(), "final_loss_finite": loss is not None and math.isfinite(float(loss))}
    )


class WorkerError(RuntimeError):
    """A worker process exited or broke the protocol; the message carries the end of its stderr."""


class Worker:
    """One variant's measuring subprocess, alive for a round so that its blocks can alternate with the
    other variants' (compiled and warmed up once)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=REPO,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        self.info = self._receive()

    def _receive(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._proc.wait()
        self._stderr.seek(0)
        raise WorkerError(f"worker exited with status {self._proc.returncode}: {self._stderr.read()[-2000:]}")

    def request(self, message: dict) -> dict:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        return self._receive()

    def stop(self) -> dict:
        final = self.request({"stop": True})
        self._proc.stdin.close()
        self._proc.wait()
        self._stderr.close()
        return final

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._stderr.close()


def core_round_trip_ns(iterations: int = 20000, repeats: int = 3):
    """Round trip of a value between two processes pinned to this process's first two CPUs, spinning on
    one shared word (best of `repeats`, in ns); None off Linux or with fewer than two CPUs.

    On a 2-vCPU KVM guest of an AMD EPYC host it is bimodal, ~150 ns or ~380 ns, as the host places the
    vCPUs on cores near each other or far apart for seconds to minutes; medjax's step is ~28% slower in the
    far placement (XLA's memory-bound fusions, which hand data between the cores, take up to twice as long)
    while PyTorch's is not, so the benchmark records it for every block."""
    if not hasattr(os, "sched_setaffinity") or not hasattr(os, "fork"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    word = memoryview(mmap.mmap(-1, mmap.PAGESIZE)).cast("q")
    best = None
    for _ in range(repeats):
        word[0] = 0
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {cpus[1]})
                for i in range(iterations):
                    want = 2 * i + 1
                    while word[0] != want:
                        pass
                    word[0] = want + 1
            finally:
                os._exit(0)
        try:
            os.sched_setaffinity(0, {cpus[0]})
            t0 = time.perf_counter()
            for i in range(iterations):
                want = 2 * i + 2
                word[0] = want - 1
                while word[0] != want:
                    pass
            elapsed = time.perf_counter() - t0
        finally:
            os.waitpid(pid, 0)
            os.sched_setaffinity(0, set(cpus))
        best = elapsed if best is None else min(best, elapsed)
    return best / iterations * 1e9


def measure_round(specs: list[dict], blocks: int, probe_cores: bool = True) -> list[dict]:
    """Starts one worker per spec (one after another, so that compiling and warming up have the machine to
    themselves), then runs `blocks` blocks of each spec's timed steps, the workers taking turns (order
    rotated every block), so that every variant of a block meets the same machine. Returns one record per
    spec: images/s from the median step time over all its blocks, each block's images/s, the core round
    trip measured before each block, peak RSS; or an error record."""
    workers, records = [], {}
    for spec in specs:
        try:
            workers.append(Worker(spec))
        except WorkerError as e:
            records[spec["variant"]] = dict(spec, error=str(e))
    times = {w.spec["variant"]: [] for w in workers}
    block_ips = {w.spec["variant"]: [] for w in workers}
    round_trips = []
    for b in range(blocks if workers else 0):
        round_trips.append(core_round_trip_ns() if probe_cores else None)
        shift = b % len(workers)
        for w in workers[shift:] + workers[:shift]:
            if w.spec["variant"] in records:
                continue
            time.sleep(HANDOFF_PAUSE_S)
            try:
                block = w.request({"steps": w.spec["steps"]})["step_times"]
            except (WorkerError, OSError) as e:
                records[w.spec["variant"]] = dict(w.spec, error=str(e))
                continue
            times[w.spec["variant"]] += block
            block_ips[w.spec["variant"]].append(w.spec["batch_size"] / statistics.median(block))
    for w in workers:
        variant = w.spec["variant"]
        if variant in records:
            w.kill()
            continue
        try:
            final = w.stop()
        except (WorkerError, OSError) as e:
            records[variant] = dict(w.spec, error=str(e))
            continue
        if not final.pop("final_loss_finite"):
            records[variant] = dict(w.spec, error="non-finite loss")
            continue
        step_s = statistics.median(times[variant])
        records[variant] = dict(
            w.spec,
            **{k: v for k, v in w.info.items() if k != "ready"},
            **final,
            step_s=step_s,
            images_per_second=w.spec["batch_size"] / step_s,
            block_images_per_second=block_ips[variant],
            core_round_trip_ns=round_trips,
        )
    return [records[spec["variant"]] for spec in specs]


def measure(spec: dict, blocks: int = 1) -> dict:
    """One spec measured alone (its own worker process); its record or an error record."""
    return measure_round([spec], blocks)[0]


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


def _block_ratios(by_model, reference):
    """model -> medjax variant -> [(ratio, core round trip ns)]: the variant's images/s over `reference`'s
    in each block of each round (the two ran one after the other on the same machine state)."""
    ratios = {}
    for model, by_variant in by_model.items():
        reference_by_round = {r["round"]: r for r in by_variant.get(reference, [])}
        for v, rs in by_variant.items():
            if not v.startswith("medjax"):
                continue
            pairs = []
            for r in rs:
                if r["round"] not in reference_by_round:
                    continue
                theirs = reference_by_round[r["round"]]["block_images_per_second"]
                mine = r["block_images_per_second"]
                for b in range(min(len(mine), len(theirs))):
                    pairs.append((mine[b] / theirs[b], r["core_round_trip_ns"][b]))
            if pairs:
                ratios.setdefault(model, {})[v] = pairs
    return ratios


def _paired_summaries(block_ratios):
    """Medians of the same-block ratios: over all blocks, and over the blocks of each core placement."""
    paired, by_placement = {}, {"near": {}, "far": {}}
    for model, by_variant in block_ratios.items():
        for v, pairs in by_variant.items():
            paired.setdefault(model, {})[v] = statistics.median(ratio for ratio, _ in pairs)
            for placement, selected in (
                ("near", [q for q, ns in pairs if ns is not None and ns < NEAR_ROUND_TRIP_NS]),
                ("far", [q for q, ns in pairs if ns is not None and ns >= NEAR_ROUND_TRIP_NS]),
            ):
                if selected:
                    by_placement[placement].setdefault(model, {})[v] = {
                        "ratio": statistics.median(selected),
                        "blocks": len(selected),
                    }
    return paired, by_placement


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
        paired, by_placement = _paired_summaries(_block_ratios(by_model, reference))
        summary[f"ratio_vs_{reference}_paired"] = paired
        summary[f"ratio_vs_{reference}_paired_by_cores"] = by_placement
        summary[f"ratio_vs_{reference}"] = _ratios(ips, memory, reference)
    # One round trip per block of each round (all variants of a model's round share them).
    round_trips = [
        ns
        for rs in by_model.values()
        for r in next(iter(rs.values()))
        for ns in r["core_round_trip_ns"]
        if ns is not None
    ]
    if round_trips:
        summary["core_round_trip_ns"] = {
            "median": statistics.median(round_trips),
            "far_share": sum(ns >= NEAR_ROUND_TRIP_NS for ns in round_trips) / len(round_trips),
        }
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
    parser.add_argument("--blocks", type=int, default=3, help="Blocks of timed steps per variant and round.")
    parser.add_argument(
        "--steps", type=int, default=0, help="Timed steps per block (0: the model's default)."
    )
    parser.add_argument("--warmup", type=int, default=-1, help="Untimed steps after compile (-1: default).")
    parser.add_argument("--dtype", default="float32", help="medjax compute dtype (float32 or bfloat16).")
    parser.add_argument("--torch_channels_last", action="store_true", help="PyTorch in NHWC memory format.")
    parser.add_argument(
        "--probe_cores", type=int, default=1, help="1: measure the core round trip before every block."
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(json.loads(args.worker))
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
            _, _, steps, warmup = MODELS[name]
            # Rotate the order every round so that no variant always starts first (or after the same one).
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            specs = [
                {
                    "model": name,
                    "variant": variant,
                    "ops": {"medjax": "cpu", "medjax_flax": "flax"}.get(variant),
                    "batch_size": args.batch_size,
                    "steps": args.steps or steps,
                    "warmup": warmup if args.warmup < 0 else args.warmup,
                    "dtype": args.dtype,
                    "channels_last": args.torch_channels_last,
                    "round": r,
                }
                for variant in order
            ]
            for result in measure_round(specs, args.blocks, probe_cores=bool(args.probe_cores)):
                result["loadavg"] = os.getloadavg()
                results.append(result)
                print(json.dumps(result), flush=True)
    print(json.dumps({**summarize(results), "busy_at_start": busy}), flush=True)


if __name__ == "__main__":
    main()
