"""Throughput of tools/preprocess_data.py against the raw batch-encode speed of its tokenizer.

Why: preprocessing a pretraining corpus is a cost users pay before the first step. The tokenizer's own
batch encoder (HF `tokenizers`' `encode_batch`, parallel over `--workers` threads) is the limit for any
tool built on it; the target is that the whole tool (start-up, reading and parsing the JSONL, encoding,
writing .bin/.idx) reaches at least 80 % of that limit with the same number of workers.

    python bench/preprocess_throughput.py                     # sample corpus x 8 (~16 MB), GPT-2 BPE 8k, workers 1,2
    python bench/preprocess_throughput.py --input corpus.jsonl --vocab-file vocab.json --merge-file merges.txt

How it is fair:
- Same texts: the raw side encodes the `text` values of the non-blank lines (a list value: each string),
  exactly what the tool encodes; the script checks that both produce the same number of ids (the tool's
  count less its EODs) and stops if not.
- Same threads: the raw side runs with RAYON_NUM_THREADS=workers; the tool with --workers workers (each
  worker one thread).
- The raw side times only `encode_batch` over texts already in memory (no start-up, no file reading or JSON
  parsing, no output); the tool is timed as a user runs it, process start-up included. The default corpus
  is the sample corpus (2 MB) repeated 8 times, so start-up (~0.3 s) is a few percent of the run.
- Both sides run in fresh processes (the thread count of `tokenizers` is fixed when its pool first
  starts), alternating, --repeats times; medians. tokens/s uses the tool's token count (EOD included,
  `--append-eod`) for both sides, so the ratio is a ratio of times.
- CPU time (all threads and worker processes) is reported next to wall time: on a machine shared with
  other work the wall-clock ratio is noise, while the CPU-time ratio still says how much work the tool adds
  on top of the encoder. The headline is the wall-clock ratio on an idle machine.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RAW = r"""
import json, sys, time
from megatron.core.tokenizer.gpt2_bpe import GPT2BPETokenizer
tok = GPT2BPETokenizer(sys.argv[2], sys.argv[3])._tok
texts = []
with open(sys.argv[1], "rb") as f:
    for line in f:
        if line.strip():  # the tool skips blank lines
            value = json.loads(line)["text"]
            texts.extend(value if isinstance(value, list) else [value])
w0, c0 = time.perf_counter(), time.process_time()
n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - w0, "cpu": time.process_time() - c0, "ids": n}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="JSONL corpus with a 'text' key (default: the sample corpus, repeated)")
    p.add_argument("--repeat", type=int, default=8, help="copies of the sample corpus in the default input")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--markdown")
    return p.parse_args(argv)


def run(cmd, env=None):
    """stdout of `cmd`, and the CPU seconds it and its children (pool workers included) used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out.stdout, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare(args, tmp):
    """(corpus, MB), building the sample corpus and an 8k BPE when not given."""
    corpus = args.input
    if corpus is None:
        one = os.path.join(tmp, "sample.jsonl")
        run([args.python, "tools/make_sample_corpus.py", "--output", one])
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(one) as f:
            text = f.read()
        with open(corpus, "w") as f:
            f.write(text * args.repeat)
    if not (args.vocab_file and args.merge_file):
        run([args.python, "tools/train_tokenizer.py", "--input", corpus, "--type", "gpt2-bpe", "--vocab-size", "8192",
             "--output-dir", os.path.join(tmp, "tok")])
        args.vocab_file, args.merge_file = (os.path.join(tmp, "tok", name) for name in ("vocab.json", "merges.txt"))
    return corpus, os.path.getsize(corpus) / 1e6


def raw_encode(args, corpus, workers):
    """(wall seconds, CPU seconds, ids) of one encode_batch over the corpus' texts."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    out = json.loads(run([args.python, "-c", RAW, corpus, args.vocab_file, args.merge_file], env=env)[0])
    return out["seconds"], out["cpu"], out["ids"]


def preprocess(args, corpus, workers, tmp):
    """(wall seconds, CPU seconds, tokens written, EODs written) of one tool run, start-up included."""
    prefix = os.path.join(tmp, f"out_{workers}")
    t0 = time.perf_counter()
    _, cpu = run([args.python, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
                  "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", args.vocab_file, "--merge-file",
                  args.merge_file, "--append-eod", "--workers", str(workers), "--log-interval", "1000000",
                  "--no-progress-bar"])
    seconds = time.perf_counter() - t0
    import numpy as np

    from megatron.core.datasets.indexed import IndexedDataset

    ds = IndexedDataset(prefix + "_text_document")
    tokens = int(ds.sequence_lengths.sum())
    eods = int(np.count_nonzero(np.diff(ds.document_indices)))  # one per document with any sequence
    return seconds, cpu, tokens, eods


def main(argv=None):
    args = parse_args(argv)
    lines = ["| workers | corpus MB | tokens | raw encode_batch tokens/s | preprocess_data.py tokens/s | tool / raw "
             "| tool / raw, CPU time |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        corpus, mb = prepare(args, tmp)
        print(lines[0], lines[1], sep="\n", flush=True)
        for workers in (int(w) for w in args.workers.split(",")):
            raw, tool = [], []
            for _ in range(args.repeats):
                raw.append(raw_encode(args, corpus, workers))
                tool.append(preprocess(args, corpus, workers, tmp))
                ids, (tokens, eods) = raw[-1][2], tool[-1][2:]
                if ids != tokens - eods:
                    sys.exit(f"the raw side encoded {ids} ids, the tool wrote {tokens - eods} (+{eods} EOD): "
                             "they are not encoding the same texts")
            raw_s, raw_cpu = (statistics.median(r[i] for r in raw) for i in (0, 1))
            tool_s, tool_cpu = (statistics.median(t[i] for t in tool) for i in (0, 1))
            line = (f"| {workers} | {mb:.1f} | {tokens:,} | {tokens / raw_s:,.0f} | {tokens / tool_s:,.0f} "
                    f"| **{raw_s / tool_s:.2f}** | {raw_cpu / tool_cpu:.2f} |")
            lines.append(line)
            print(line, flush=True)
    footer = (f"\nMedians of {args.repeats} alternating runs, fresh processes. Command: python "
              f"bench/preprocess_throughput.py {' '.join(sys.argv[1:])}")
    print(footer)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
