"""Speed and peak memory of the BERT sample index (`bert_dataset.build_sample_mapping`).

Why: the index has one row per training sample; the BERT-large recipe asks for 2M x 1024 = 2B rows. The
build must stay near Megatron's C++ in memory (12 bytes a row, uint32) and be fast enough to run once.

    taskset -c 0 python bench/bert_sample_index.py                 # 1M rows, s = 512, --short-seq-prob 0.1
    python bench/bert_sample_index.py --rows 10000000 --repeats 1

The corpus is synthetic and sentence-level like real text: documents of 5..39 sentences of 10..39 tokens
(20,000 documents, ~0.44M sentences), so 1M rows take several epochs, as a long run does. Speed: wall time
of the whole build (sample walk and shuffle; the shuffle alone beside it) and its CPU time (less affected
by other jobs on the core), medians of --repeats. Memory: the
peak of Python's tracemalloc (which counts numpy's and array's buffers) in a separate run, since tracing
slows the build. Bytes per row include the fixed per-block tables, so they fall towards ~20 as rows grow.
"""

import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import megatron.core.datasets.bert_dataset as bert  # noqa: E402


def corpus(num_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 40, num_docs)  # sentences per document
    sizes = rng.integers(10, 40, int(counts.sum())).astype(np.int32)  # tokens per sentence
    docs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return docs, sizes


def build(docs, sizes, rows: int, seq_length: int, short_seq_prob: float):
    return bert.build_sample_mapping(docs, sizes, bert._MAX_EPOCHS, rows, seq_length - 3, short_seq_prob, 1234, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="samples asked for (whole epochs are built)")
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    docs, sizes = corpus(args.docs)

    shuffle_s = []
    shuffle = bert._shuffle_rows

    def timed_shuffle(mapping, seed):
        t0 = time.perf_counter()
        shuffle(mapping, seed)
        shuffle_s.append(time.perf_counter() - t0)

    bert._shuffle_rows = timed_shuffle
    walls, cpus = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        mapping = build(docs, sizes, args.rows, args.seq_length, args.short_seq_prob)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    bert._shuffle_rows = shuffle
    n = mapping.shape[0]

    tracemalloc.start()
    build(docs, sizes, args.rows, args.seq_length, args.short_seq_prob)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    wall, cpu, sh = statistics.median(walls), statistics.median(cpus), statistics.median(shuffle_s)
    print(f"{len(sizes)} sentences in {args.docs} documents, s {args.seq_length}, short-seq-prob "
          f"{args.short_seq_prob}: {n} rows ({mapping.dtype}, {mapping.nbytes / n:.0f} bytes a row)")
    print(f"build {wall:.2f} s wall (median of {args.repeats}; shuffle {sh:.2f} s of it): {n / wall:,.0f} rows/s; "
          f"{cpu:.2f} s of CPU: {n / cpu:,.0f} rows per CPU second")
    print(f"peak traced memory {peak / 1e6:.1f} MB: {peak / n:.1f} bytes a row")


if __name__ == "__main__":
    main()
