"""A benchmark's output: one JSON line per record as it comes, then a markdown table, and last a JSON
summary line; the same three are written to <out>/results.jsonl, results.md and summary.json."""

import json
import os


class ResultWriter:
    """Prints and saves the records, table and summary of one benchmark run."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self._out_dir = out_dir
        self.records = []
        open(self._path("results.jsonl"), "w").close()

    def _path(self, name: str) -> str:
        return os.path.join(self._out_dir, name)

    def add(self, record: dict) -> None:
        self.records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        with open(self._path("results.jsonl"), "a") as f:
            f.write(line + "\n")

    def finish(self, summary: dict, table: str) -> None:
        """Writes the table, then the summary, so the summary is the last line printed."""
        print(table, flush=True)
        with open(self._path("results.md"), "w") as f:
            f.write(table)
        with open(self._path("summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps({"summary": summary}), flush=True)


def mean_std(values) -> dict:
    """{'mean', 'std'} of the non-None values: sample std, None for fewer than two values."""
    kept = [float(v) for v in values if v is not None]
    mean = sum(kept) / len(kept) if kept else None
    std = (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) ** 0.5 if len(kept) > 1 else None
    return {"mean": mean, "std": std}


def format_stat(stat: dict, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (or 'mean' for one seed, 'n/a' for none) of a `mean_std` result, scaled."""
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {stat['std'] * scale:.{digits}f}"
