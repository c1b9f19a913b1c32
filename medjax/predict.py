"""Prediction job: class probabilities of image files (PNG, JPEG, DICOM) from a training workdir.

  python -m medjax.predict --workdir=W [--step=N] [--output=FILE.json|FILE.csv] [--explain=DIR] PATH...

PATHs are files and folders (searched recursively; see images.find_files). Each image is read by
medjax.images, fitted to the checkpoint's stored image shape (with a warning naming the file when it is
resized or converted), then run in padded batches through the jitted evaluation step with the stored
preprocessing. The report (JSON, or CSV by --output's extension; JSON on stdout without --output) has one
row per file: its predictions or its error. Exit status: 0 if every file got a prediction, 3 if any file
failed (the others still get theirs), 1 if the job could not run (see docs/predict.md).
"""

import csv
import functools
import io
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from medjax import checkpointing
from medjax import evaluation
from medjax import explain
from medjax import files
from medjax import images
from medjax import ops
from medjax import sharding
from medjax import steps
from medjax import train
from medjax import transfer

EXIT_FILE_ERRORS = 3


class Model:
    """A checkpoint restored for prediction: its class names, preprocessing, model, variables and the
    jitted predictor (built through medjax.ops, as training and evaluation build theirs)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | None = None):
        manager = checkpointing.create_manager(workdir, read_only=True)
        self.step = checkpointing.resolve_step(manager, step)
        metadata = checkpointing.restore_metadata(manager, self.step)
        config = ml_collections.ConfigDict(metadata["config"])
        self.workdir = files.absolute(workdir)
        self.class_names = list(metadata["class_names"])
        self.preprocessing = metadata["preprocessing"]
        self.image_shape = tuple(self.preprocessing["image_shape"])
        self.batch_size = batch_size or config.eval.batch_size
        mesh = sharding.create_mesh()
        chosen_ops = ops.resolve(config)
        logging.info("Ops: %s.", chosen_ops.describe())
        self.model = chosen_ops.create_model(config.model, len(self.class_names))
        input_kwargs = {k: self.preprocessing.get(k, 0) for k in ("image_size", "channels")}
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
            transfer.abstract_variables(
                self.model, steps.model_input_shape(self.image_shape, **input_kwargs)
            ),
        )
        self.variables = checkpointing.restore_variables(workdir, self.step, abstract)
        self.predictor = evaluation.Predictor(
            self.model,
            mesh,
            mean=self.preprocessing["mean"],
            std=self.preprocessing["std"],
            compiler_options=chosen_ops.compiler_options(config.model.name),
            **input_kwargs,
        )

    @functools.cached_property
    def grad_cam(self) -> explain.GradCam:
        grad_cam = explain.GradCam(self.model, self.variables, self.image_shape, self.preprocessing)
        logging.info("Grad-CAM on the output of %s.", "/".join(grad_cam.stage[0]))
        return grad_cam

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """[N, num_classes] for uint8 [N, *image_shape] pixels."""
        labels = np.zeros(len(pixels), np.int32)
        return self.predictor.predict(self.variables, pixels, labels, self.batch_size)


def _load(path: str, image_shape, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    decoded = images.read_image(path, max_pixels)
    pixels, changes = images.fit(decoded.pixels, image_shape)
    for change in changes:
        logging.warning("%s: %s to the model's stored image shape %s.", path, change, list(image_shape))
    return pixels, list(decoded.notes + changes)


def predict_files(
    model: Model, paths: list[str], *, max_pixels: int = images.MAX_PIXELS, explain_dir: str | None = None
) -> dict:
    """The report for `paths` (files and folders): one entry per file, with its predictions or its error."""
    inputs, skipped = images.find_files(paths)
    for path in skipped:
        logging.warning("%s: skipped (not a PNG, JPEG or DICOM file name).", path)
    rows = []
    for start in range(0, len(inputs), model.batch_size):
        chunk, good = inputs[start : start + model.batch_size], []
        for path in chunk:
            try:
                pixels, notes = _load(path, model.image_shape, max_pixels)
            except images.ImageError as e:
                logging.error("%s: %s", path, e)
                rows.append({"file": path, "error": str(e)})
                continue
            except Exception as e:  # Any other failure on one file must not stop the others.
                logging.exception("%s: unexpected error reading the file.", path)
                rows.append(
                    {"file": path, "error": f"unexpected error reading the file: {type(e).__name__}: {e}"}
                )
                continue
            rows.append({"file": path, "notes": notes})
            good.append(
                (rows[-1], pixels, f"{len(rows) - 1:05d}_{os.path.splitext(os.path.basename(path))[0]}")
            )
        if not good:
            continue
        pixels = np.stack([p for _, p, _ in good])
        probs = model.probabilities(pixels)
        for (row, _, _), p in zip(good, probs):
            top = int(np.argmax(p))
            row |= {
                "top_class": model.class_names[top],
                "top_probability": float(p[top]),
                "probabilities": {name: float(v) for name, v in zip(model.class_names, p)},
            }
        if explain_dir:
            _explain(model, explain_dir, good, pixels)
    failed = sum("error" in row for row in rows)
    return {
        "workdir": model.workdir,
        "checkpoint_step": model.step,
        "class_names": model.class_names,
        "preprocessing": model.preprocessing,
        "num_files": len(rows),
        "num_failed": failed,
        "skipped": skipped,
        "files": rows,
    }


def _explain(model: Model, explain_dir: str, good, pixels: np.ndarray) -> None:
    """Writes `<index>_<name>.gradcam.png` and `.occlusion.png` per file and records their paths."""
    os.makedirs(explain_dir, exist_ok=True)
    classes = np.array([model.class_names.index(row["top_class"]) for row, _, _ in good], np.int32)
    maps, _ = model.grad_cam(pixels, model.batch_size, classes)
    for (row, image, stem), cam, top in zip(good, maps, classes):
        heat = explain.occlusion(model.probabilities, image, top, mean=model.preprocessing["mean"])
        row["explanations"] = {}
        for method, heat_map in (("gradcam", cam), ("occlusion", heat)):
            path = os.path.join(explain_dir, f"{stem}.{method}.png")
            explain.save_overlay(path, image, heat_map)
            row["explanations"][method] = path


CSV_FIELDS = ("file", "status", "top_class", "top_probability")


def to_csv(report: dict) -> str:
    """One line per file: file, status (ok / error), top_class, top_probability, one probability column
    per class (`probability_<class>`), notes and error (';'-joined), explanation paths."""
    classes = [f"probability_{name}" for name in report["class_names"]]
    fields = [*CSV_FIELDS, *classes, "notes", "error", "gradcam", "occlusion"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in report["files"]:
        line = {"file": row["file"], "status": "error" if "error" in row else "ok"}
        line["error"] = row.get("error", "")
        line["notes"] = "; ".join(row.get("notes", []))
        if "probabilities" in row:
            line |= {"top_class": row["top_class"], "top_probability": repr(row["top_probability"])}
            line |= {f"probability_{k}": repr(v) for k, v in row["probabilities"].items()}
        line |= row.get("explanations", {})
        writer.writerow(line)
    return out.getvalue()


def write_report(report: dict, output: str | None) -> None:
    """JSON to stdout (no `output`), or to `output` as JSON or CSV by its extension."""
    if output is None:
        print(json.dumps(report, indent=1))
    elif output.lower().endswith(".csv"):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", newline="") as f:
            f.write(to_csv(report))
    else:
        files.write_json(output, report)


def run(
    workdir: str,
    paths: list[str],
    *,
    step: int | None = None,
    output: str | None = None,
    explain_dir: str | None = None,
    batch_size: int | None = None,
    max_pixels: int = images.MAX_PIXELS,
) -> int:
    """Predicts `paths`, writes the report, and returns the exit status (0, or EXIT_FILE_ERRORS)."""
    report = predict_files(
        Model(workdir, step, batch_size), paths, max_pixels=max_pixels, explain_dir=explain_dir
    )
    write_report(report, output)
    logging.info("%d files, %d failed.", report["num_files"], report["num_failed"])
    return EXIT_FILE_ERRORS if report["num_failed"] else 0


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: medjax.evaluate has flags of the same
    names, and both modules are imported together in tests)."""
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: latest).")
    flags.DEFINE_string("output", None, "Report file, .json or .csv (default: JSON on stdout).")
    flags.DEFINE_string("explain", None, "Folder for Grad-CAM and occlusion overlay PNGs per file.")
    flags.DEFINE_integer("batch_size", None, "Global batch size (default: config.eval.batch_size).")
    flags.DEFINE_integer("max_pixels", images.MAX_PIXELS, "Refuse images with more pixels.")


def main(argv):
    FLAGS = flags.FLAGS
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give at least one image file or folder.")
    if FLAGS.output and os.path.splitext(FLAGS.output)[1].lower() not in (".json", ".csv"):
        raise app.UsageError(f"--output={FLAGS.output} must end in .json or .csv.")
    if not images.find_files(paths)[0]:
        sys.exit(f"No PNG, JPEG or DICOM files in {paths}.")
    train.quiet_library_logs()
    tf.config.set_visible_devices([], "GPU")
    try:
        status = run(
            FLAGS.workdir,
            paths,
            step=FLAGS.step,
            output=FLAGS.output,
            explain_dir=FLAGS.explain,
            batch_size=FLAGS.batch_size,
            max_pixels=FLAGS.max_pixels,
        )
    except (checkpointing.BadCheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(str(e))  # One line on stderr, exit status 1.
    sys.exit(status)


if __name__ == "__main__":
    define_flags()
    app.run(main)
