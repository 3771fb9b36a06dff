"""The study's results table (markdown), from what run_study.sh left in the study folder.

    python bench/study/summarize.py --study-dir runs/study > results.md

Per run: length (iterations, raw tokens read, layer-tokens and their share of B), the theoretical layer-token
saving against dense training on the same samples, time (training steps only, and the whole process),
the last in-training validation loss, the loss on the whole held-out text (`heldout_loss.py`, the same
tokens for every run: the number the verdict uses) and the zero-shot metrics.
"""

import argparse
import json
import math
import os
import sys

RUNS = ("dense_B", "dense_2B3", "ltd_2B3", "ltd_2B3_iterlr", "const_2B3")
TITLES = {"dense_B": "1 dense, B", "dense_2B3": "2 dense, 2B/3", "ltd_2B3": "3 LTD + MSLG + LayerToken LR, 2B/3",
          "ltd_2B3_iterlr": "4 LTD + MSLG, iteration LR, 2B/3", "const_2B3": "5 constant r, LayerToken LR, 2B/3"}


def _records(path):
    train, val = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                (val if "val_loss" in rec else train).append(rec)
    return train, val


def _metric(results, task, name):
    value = results.get("results", {}).get(task, {}).get(f"{name},none")
    return value if isinstance(value, (int, float)) else float("nan")


def load_run(run_dir):
    train, val = _records(os.path.join(run_dir, "metrics.jsonl"))
    last = train[-1]
    out = {"iterations": last["iteration"], "samples": last["consumed_samples"], "raw_tokens": last["consumed_tokens"],
           "layer_tokens": last["consumed_layer_tokens"], "saving": last["layer_token_saving"],
           "train_time_s": last.get("train_time_s", float("nan")), "val_loss": val[-1]["val_loss"] if val else None,
           "r_final": last["kept_length"]}
    with open(os.path.join(run_dir, "wall_seconds")) as f:
        out["wall_s"] = float(f.read())
    with open(os.path.join(run_dir, "heldout.json")) as f:
        held = json.load(f)
    out["heldout_loss"], out["heldout_ppl"], out["heldout_tokens"] = held["loss"], held["ppl"], held["tokens"]
    zs_path = os.path.join(run_dir, "zeroshot.json")
    zs = json.load(open(zs_path)) if os.path.exists(zs_path) else {}
    out["lastword_acc"] = _metric(zs, "kjv_lastword", "acc")
    out["lastword_ppl"] = _metric(zs, "kjv_lastword", "perplexity")
    out["pages_word_ppl"] = _metric(zs, "kjv_pages", "word_perplexity")
    out["pages_bpb"] = _metric(zs, "kjv_pages", "bits_per_byte")
    return out


def table(runs: dict, budget: int) -> str:
    head = ("| run | iterations | raw tokens read | layer-tokens (share of B) | theoretical saving vs dense, same "
            "samples | train time (s) | process wall (s) | last val loss (trainer) | **held-out loss** | held-out ppl "
            "| last-word acc | last-word ppl | pages word ppl | pages bits/byte |")
    rows = [head, "|" + "---|" * 14]
    for name, r in runs.items():
        rows.append(
            f"| {TITLES[name]} | {r['iterations']} | {r['raw_tokens']:,} | {r['layer_tokens']:,} "
            f"({r['layer_tokens'] / budget:.3f}) | {100 * r['saving']:.1f} % | {r['train_time_s']:.0f} | "
            f"{r['wall_s']:.0f} | {r['val_loss']:.4f} | **{r['heldout_loss']:.4f}** | {r['heldout_ppl']:.2f} | "
            f"{r['lastword_acc']:.3f} | {r['lastword_ppl']:.1f} | {r['pages_word_ppl']:.2f} | {r['pages_bpb']:.4f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-dir", required=True)
    args = p.parse_args(argv)
    present = [n for n in RUNS if os.path.exists(os.path.join(args.study_dir, "runs", n, "heldout.json"))]
    if not present:
        print(f"error: no finished runs under {args.study_dir}/runs; run bench/study/run_study.sh", file=sys.stderr)
        return 2
    runs = {n: load_run(os.path.join(args.study_dir, "runs", n)) for n in present}
    budget = runs["dense_B"]["layer_tokens"] if "dense_B" in runs else max(r["layer_tokens"] for r in runs.values())
    print(table(runs, budget))
    print()
    print(f"B = {budget:,} layer-tokens; held-out loss over {runs[present[0]]['heldout_tokens']:,} tokens.")
    if {"dense_B", "dense_2B3", "ltd_2B3"} <= set(runs):
        d1, d2, l3 = (runs[n] for n in ("dense_B", "dense_2B3", "ltd_2B3"))
        gap = d2["heldout_loss"] - d1["heldout_loss"]
        print(f"- run 3 - run 1 held-out loss: {l3['heldout_loss'] - d1['heldout_loss']:+.4f} "
              f"(ppl ratio {math.exp(l3['heldout_loss'] - d1['heldout_loss']):.3f})")
        print(f"- run 3 - run 2 held-out loss: {l3['heldout_loss'] - d2['heldout_loss']:+.4f}")
        if gap > 0:
            print(f"- run 3 recovers {100 * (d2['heldout_loss'] - l3['heldout_loss']) / gap:.0f} % of the gap "
                  f"between the 2B/3 and the B dense baselines ({gap:.4f})")
        print(f"- training time of run 3 / run 1: {l3['train_time_s'] / d1['train_time_s']:.3f} "
              f"(layer-tokens {l3['layer_tokens'] / d1['layer_tokens']:.3f}); run 2 / run 1: "
              f"{d2['train_time_s'] / d1['train_time_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
