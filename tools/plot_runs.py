"""Plot training runs from their `--log-json` files: validation loss against layer-tokens and against
training wall-clock, training loss, and the random-LTD kept length r_t.

    python tools/plot_runs.py runs/dense/metrics.jsonl runs/ltd/metrics.jsonl --output-dir plots
    python tools/plot_runs.py a.jsonl b.jsonl --labels "dense B,random-LTD 2B/3" --output-dir plots --title KJV

Writes `val_loss_vs_layer_tokens.png`, `val_loss_vs_time.png`, `train_loss_vs_layer_tokens.png` and
`kept_length.png` into the output folder (each through a temporary file, so an interrupted run never
leaves a half-written PNG). Why layer-tokens: random-LTD's claim is about compute, and a layer-token is
what a transformer layer spends on one token, so runs with and without dropping compare on one axis.
The wall-clock axis is the time spent in training steps (`train_time_s`), without evaluation or saving;
for logs that predate that field it is rebuilt from `elapsed_ms_per_iteration`.

A label defaults to the name of the folder holding the file (`runs/ltd/metrics.jsonl` -> `ltd`). A log
that was appended to by a resumed run is read as one run: a later record for the same iteration
replaces the earlier one.
"""

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402

PLOTS = ("val_loss_vs_layer_tokens", "val_loss_vs_time", "train_loss_vs_layer_tokens", "kept_length")


def read_run(path: str) -> dict:
    """{"train": [records by iteration], "val": [...]} from one --log-json file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; pass the --log-json files of the runs to plot")
    train, val = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON; is this a --log-json file?")
            if not isinstance(rec, dict) or "iteration" not in rec:
                raise UserError(f"{path} line {n} has no 'iteration'; is this a --log-json file?")
            if "val_loss" in rec:
                val[rec["iteration"]] = rec
            elif "lm_loss" in rec:
                if "ltd_seq_length" in rec:  # logs written before r_t was named kept_length
                    rec.setdefault("kept_length", rec.pop("ltd_seq_length"))
                train[rec["iteration"]] = rec
    if not train:
        raise UserError(f"{path} holds no training records (lm_loss); is this a --log-json file?")
    train = [train[k] for k in sorted(train)]
    _fill_train_time(train)
    val = [val[k] for k in sorted(val)]
    for rec in val:  # older logs: take the counters from the training record of the same iteration
        for key in ("consumed_layer_tokens", "train_time_s"):
            if key not in rec:
                rec[key] = _interpolate(train, rec["iteration"], key)
    return {"train": train, "val": val}


def _fill_train_time(train: list) -> None:
    """train_time_s from the per-iteration averages where the log lacks it."""
    if all("train_time_s" in r for r in train):
        return
    seconds, last = 0.0, 0
    for rec in train:
        seconds += rec["elapsed_ms_per_iteration"] / 1000.0 * (rec["iteration"] - last)
        last = rec["iteration"]
        rec["train_time_s"] = seconds


def _interpolate(train: list, iteration: int, key: str) -> float:
    points = [(0, 0.0)] + [(r["iteration"], r[key]) for r in train if key in r]
    for (i0, v0), (i1, v1) in zip(points, points[1:]):
        if i0 <= iteration <= i1:
            return v0 + (v1 - v0) * (iteration - i0) / max(i1 - i0, 1)
    return points[-1][1]


def default_label(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.stem in ("metrics", "log") and p.parent.name else p.stem


def plot(runs: dict, output_dir: str, title: str = "") -> list:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    specs = {
        "val_loss_vs_layer_tokens": ("val", "consumed_layer_tokens", "val_loss", "layer-tokens consumed",
                                     "validation loss"),
        "val_loss_vs_time": ("val", "train_time_s", "val_loss", "training time (s, steps only)", "validation loss"),
        "train_loss_vs_layer_tokens": ("train", "consumed_layer_tokens", "lm_loss", "layer-tokens consumed",
                                       "training loss (interval mean)"),
        "kept_length": ("train", "iteration", "kept_length", "iteration", "kept tokens per sample r_t"),
    }
    written = []
    for name in PLOTS:
        kind, xkey, ykey, xlabel, ylabel = specs[name]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        drawn = 0
        for label, run in runs.items():
            pts = [(r[xkey], r[ykey]) for r in run[kind] if xkey in r and ykey in r and _finite(r[ykey])]
            if pts:
                xs, ys = zip(*pts)
                style = "-o" if kind == "val" else "-"
                ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.3)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        if kind == "val" and ykey == "val_loss":
            _zoom_to_tail(ax, runs, kind, ykey)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel}" if title else ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(output_dir, f"{name}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _zoom_to_tail(ax, runs: dict, kind: str, ykey: str) -> None:
    """Validation curves start near ln(vocab) and end close together: show the last 80 % of each run."""
    tails = []
    for run in runs.values():
        ys = [r[ykey] for r in run[kind] if _finite(r.get(ykey))]
        tails += ys[len(ys) // 5:]
    if len(tails) >= 2:
        lo, hi = min(tails), max(tails)
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="--log-json files, one per run")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per file")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [default_label(x) for x in args.logs]
    if len(labels) != len(args.logs):
        raise UserError(f"--labels names {len(labels)} runs but {len(args.logs)} log files were given")
    if len(set(labels)) != len(labels):
        raise UserError(f"two runs share a label ({', '.join(labels)}); pass distinct --labels")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("matplotlib is not installed; install the plots extra: pip install -e '.[plots]'")
    runs = {label: read_run(path) for label, path in zip(labels, args.logs)}
    for path in plot(runs, args.output_dir, args.title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
