"""Continuous evaluation: scores every committed checkpoint of a workdir once, beside (or after) training.

  python -m medjax.evaluate --workdir=W --watch [--split=validation] [--best_metric=accuracy]
      [--poll_interval=10] [--timeout=SECONDS]

Each checkpoint's report goes to `W/eval/<split>_step<N>.json` and its top-level numeric metrics to
TensorBoard scalars `<split>/<metric>` under `W/eval/`. `W/eval/watch_<split>.json` records the steps
already evaluated (a restarted watcher skips them); `W/eval/best.json` (`best_<split>.json` for a split
other than validation) names the step with the highest `best_metric` (ties: the earlier step).

Only committed checkpoints are seen: orbax writes a step to `<step>.orbax-checkpoint-tmp-*` and renames it
when complete (or, on object stores, adds `commit_success.txt`), and the manager lists only finished
ones. A checkpoint deleted (max_to_keep) before it was evaluated, or one that is bad
(checkpointing.BadCheckpointError), is logged and skipped.

The watcher stops once the newest checkpoint is the final one: training writes it last, with
batch-norm statistics marked "calibrated ..." in its metadata (also after early stopping, where the
final step is not the configured number of steps). Exit status 0 then; EXIT_TIMEOUT when no new
checkpoint appeared for `timeout` seconds (training died, hangs or was preempted).
"""

import json
import math
import os
import time
from typing import Callable

from absl import logging
from clu import metric_writers
from etils import epath

from medjax import checkpointing
from medjax import files
from medjax import plots

EXIT_TIMEOUT = 124  # As coreutils' `timeout`.
NOT_SCALARS = ("checkpoint_step", "num_examples")


def write_report(report: dict, paths: list[str]) -> None:
    """Writes `report` as JSON to each path, and its plots next to it (`plots.save_report_plots`)."""
    for path in paths:
        files.write_json(path, report)
        plots.save_report_plots(report, os.path.splitext(path)[0])


def scalars(report: dict) -> dict[str, float]:
    """The report's top-level numeric metrics."""
    return {
        key: float(value)
        for key, value in report.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCALARS
    }


def best_step(evaluated: dict[int, dict], metric: str) -> tuple[int, float] | None:
    """(step, value) with the highest finite `metric` (ties: the earlier step), or None."""
    best = None
    for step in sorted(evaluated):
        value = evaluated[step]["scalars"].get(metric)
        if value is None or math.isnan(value):
            continue
        if best is None or value > best[1]:
            best = (step, value)
    return best


class _ScalarWriter:
    """TensorBoard scalars under `directory`, its event file opened at the first write."""

    def __init__(self, directory: epath.Path):
        self.directory, self.writer = directory, None

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = metric_writers.SummaryWriter(str(self.directory))
        self.writer.write_scalars(step, values)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _write_best(path: epath.Path, split: str, evaluated: dict[int, dict], metric: str) -> None:
    best = best_step(evaluated, metric)
    if best is None:
        found = sorted({key for entry in evaluated.values() for key in entry["scalars"]})
        raise ValueError(f"No step has a numeric {metric!r}; the reports have {found}.")
    files.write_json(str(path), {"split": split, "step": best[0], "metric": metric, "value": best[1]})


def _read_record(path: epath.Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    return {int(step): entry for step, entry in json.loads(path.read_text())["evaluated"].items()}


def watch(
    workdir: str,
    evaluate: Callable[[int], dict],
    *,
    split: str = "validation",
    best_metric: str = "accuracy",
    poll_interval: float = 10.0,
    timeout: float | None = None,
    write: Callable[[dict, list[str]], None] = write_report,
) -> int:
    """Evaluates each committed checkpoint of `workdir` with `evaluate(step) -> report` until the final
    one, writing each report with `write(report, paths)`; returns the exit status (0, or EXIT_TIMEOUT
    after `timeout` seconds without a new checkpoint)."""
    eval_dir = epath.Path(files.absolute(workdir)) / "eval"
    record_path = eval_dir / f"watch_{split}.json"
    best_path = eval_dir / ("best.json" if split == "validation" else f"best_{split}.json")
    evaluated = _read_record(record_path)
    bad: dict[int, bool] = {}  # Step -> final? Retried if the step is rewritten (after being set aside).
    gone: set[int] = set()  # Deleted before they could be evaluated.
    seen: set[int] = set()  # Only a step not seen before restarts the timeout.
    if evaluated:
        logging.info("Already evaluated on %s (%s): steps %s.", split, record_path, sorted(evaluated))
        _write_best(best_path, split, evaluated, best_metric)
    tensorboard = _ScalarWriter(eval_dir)
    checkpoints = epath.Path(checkpointing.checkpoint_dir(workdir))
    manager, last_new = None, time.monotonic()
    try:
        while True:
            if manager is None and checkpoints.is_dir():
                manager = checkpointing.create_manager(workdir, read_only=True)
            steps = []
            if manager is not None:
                manager.reload()
                steps = sorted(manager.all_steps())
            bad = {step: final for step, final in bad.items() if step in steps}
            for step in steps:
                if step in evaluated or step in bad or step in gone:
                    continue
                entry = _evaluate_one(manager, step, evaluate, split, eval_dir, tensorboard, write)
                if step not in seen:
                    seen.add(step)
                    last_new = time.monotonic()
                if entry is None:
                    gone.add(step)
                    continue
                if "error" in entry:
                    bad[step] = entry["final"]
                    continue
                evaluated[step] = entry
                files.write_json(str(record_path), {"split": split, "evaluated": evaluated})
                _write_best(best_path, split, evaluated, best_metric)
            finals = {step: entry["final"] for step, entry in evaluated.items()} | bad
            if steps and finals.get(steps[-1]):
                logging.info("Checkpoint %d is the final one; done.", steps[-1])
                return 0
            if timeout is not None and time.monotonic() - last_new > timeout:
                logging.error(
                    "No new checkpoint in %s for %gs; stopping (exit status %d).",
                    checkpoints,
                    timeout,
                    EXIT_TIMEOUT,
                )
                return EXIT_TIMEOUT
            time.sleep(poll_interval)
    finally:
        tensorboard.close()


def _evaluate_one(manager, step, evaluate, split, eval_dir, tensorboard, write) -> dict | None:
    """The record entry of `step`: {'final', 'scalars'}, {'final', 'error'} if the checkpoint is bad, or
    None if it was deleted before it could be read."""
    final = False
    try:
        batch_stats = checkpointing.restore_metadata(manager, step).get("batch_stats", "")
        final = batch_stats.startswith("calibrated")
        result = evaluate(step)
    except Exception as e:  # A deleted checkpoint fails in many ways; only its absence tells.
        manager.reload()
        if step not in manager.all_steps():
            logging.warning("Checkpoint %d was deleted (max_to_keep) before it was evaluated; skipped.", step)
            return None
        if isinstance(e, checkpointing.BadCheckpointError):
            logging.error("%s; skipped.", e)
            return {"final": final, "error": str(e)}
        raise
    write(result, [str(eval_dir / f"{split}_step{step}.json")])
    values = scalars(result)
    tensorboard.write(step, {f"{split}/{key}": value for key, value in values.items()})
    logging.info(
        "Evaluated checkpoint %d on %s: %s.",
        step,
        split,
        ", ".join(f"{k}={v:.6g}" for k, v in values.items()),
    )
    return {"final": final, "scalars": values}
