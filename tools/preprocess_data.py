"""Tokenize a JSONL corpus into Megatron's indexed dataset files, one `.bin/.idx` pair per JSON key.

Same flags and output names as Megatron-LM's tools/preprocess_data.py, so the files load in either:

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 8
    # -> data/corpus_text_document.bin / .idx   (train with --data-path data/corpus_text_document)

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt --split-sentences --workers 8
    # -> data/corpus_text_sentence.bin / .idx   (BERT data: one sequence per sentence)

Each line is one document: a JSON object whose `--json-keys` hold a string (or a list of strings, each
kept as its own sequence). With --split-sentences each string is split into sentences by nltk's Punkt,
offline (megatron/core/datasets/sentences.py), and each sentence is one sequence. Tokens are stored as
uint16 when the vocab has fewer than 65500 ids, else int32. A bad line stops the run with its line
number; output is written under temporary names and only renamed into place when everything succeeded,
so a failed run leaves no partial files.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tqdm import tqdm  # noqa: E402

from megatron.core.datasets.indexed import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from megatron.core.datasets.sentences import PUNKT_SOURCES, SentenceSplitter, punkt_parameters  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.core.tokenizer import (  # noqa: E402
    TokenizerConfig,
    add_tokenizer_args,
    build_tokenizer,
    tokenizer_config_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", type=str, required=True, help="JSONL file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract; one output pair each")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (BERT data)")
    g.add_argument("--keep-newlines", action="store_true", help="with --split-sentences: keep newlines")
    g.add_argument("--lang", type=str, default="english", help="with --split-sentences: NLTK punkt language")
    g.add_argument("--punkt", choices=PUNKT_SOURCES, default="auto",
                   help="with --split-sentences: Punkt parameters from the installed NLTK data (nltk), trained "
                        "on the input (input), nltk's defaults (untrained), or nltk if installed else input "
                        "(auto). Nothing is ever downloaded.")
    g.add_argument("--punkt-train-chars", type=int, default=5_000_000,
                   help="with --punkt input/auto: characters of the input to train Punkt on")
    add_tokenizer_args(p)
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to each non-empty document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", type=str, required=True,
                   help="writes {prefix}_{key}_document.bin/.idx ({prefix}_{key}_sentence with "
                        "--split-sentences)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1, help="must be 1 (kept for Megatron's command lines)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    g.add_argument("--no-progress-bar", action="store_true", help="only the periodic progress lines")
    return p


# ---------------------------------------------------------------------------------------------------
# Per-process tokenization (runs in the pool's workers, or in-process with --workers 1)
# ---------------------------------------------------------------------------------------------------
class Encoder:
    """Turns one JSONL line into {key: (token ids, sequence lengths)} or an error message.

    Each string is one sequence, or with a `splitter` one sequence per sentence; empty ones are dropped.
    """

    def __init__(self, tokenizer_config: TokenizerConfig, keys: List[str], append_eod: bool, input_name: str,
                 splitter: Optional[SentenceSplitter] = None):
        self.tokenizer_config = tokenizer_config
        self.keys = keys
        self.append_eod = append_eod
        self.input_name = input_name
        self.splitter = splitter
        self.tokenizer = None

    def start(self) -> None:
        self.tokenizer = build_tokenizer(self.tokenizer_config)

    def encode(self, item: Tuple[int, bytes]):
        """(line number, raw line) -> ("ok", {key: (ids, lengths)}, n_bytes) | ("error", message, 0)."""
        lineno, raw = item
        where = f"{self.input_name} line {lineno}"
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return "error", f"{where} is not UTF-8 ({e.reason}); re-encode the file as UTF-8", 0
        except json.JSONDecodeError as e:
            return "error", f"{where} is not valid JSON ({e.msg}, column {e.colno}); fix or remove the line", 0
        if not isinstance(doc, dict):
            return "error", f"{where} is not a JSON object; each line must be like {{\"text\": \"...\"}}", 0
        out = {}
        for key in self.keys:
            if key not in doc:
                have = ", ".join(list(doc)[:5])
                return "error", (f"{where} has no key {key!r} (it has: {have}); pass --json-keys with the key "
                                 "that holds the text"), 0
            value = doc[key]
            texts = value if isinstance(value, list) else [value]
            if not all(isinstance(t, str) for t in texts):
                return "error", f"{where}: {key!r} must be a string or a list of strings", 0
            if self.splitter is not None:
                texts = [sentence for text in texts for sentence in self.splitter.split(text)]
            ids: List[int] = []
            lengths: List[int] = []
            try:
                for text in texts:
                    piece = self.tokenizer.tokenize(text)
                    if piece:
                        ids.extend(piece)
                        lengths.append(len(piece))
            except UserError as e:
                return "error", f"{where}: {e}", 0
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            out[key] = (ids, lengths)
        return "ok", out, len(raw)


_ENCODER: Encoder = None  # the worker's own Encoder, set by _start_worker


def _start_worker(encoder: Encoder) -> None:
    global _ENCODER
    _ENCODER = encoder
    _ENCODER.start()


def _encode_in_worker(item):
    return _ENCODER.encode(item)


def _lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if args.keep_newlines and not args.split_sentences:
        raise UserError("--keep-newlines only applies with --split-sentences; add --split-sentences or drop it")
    if args.punkt_train_chars < 1:
        raise UserError(f"--punkt-train-chars must be >= 1, got {args.punkt_train_chars}")
    if not os.path.isfile(args.input):
        raise UserError(f"--input {args.input}: no such file; pass a JSONL file with one JSON document per line")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.partitions != 1:
        raise UserError("--partitions > 1 is not supported; use --workers alone for parallel tokenizing")
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be >= 1, got {args.log_interval}")
    if not args.json_keys:
        raise UserError("--json-keys needs at least one key")


def load_tokenizer(config: TokenizerConfig):
    try:
        return build_tokenizer(config)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the {config.tokenizer_type} tokenizer ({e}); check the tokenizer file flags")


def output_paths(prefix: str, key: str, level: str = "document") -> Tuple[str, str]:
    base = f"{prefix}_{key}_{level}"
    return base + ".bin", base + ".idx"


def preprocess(args: argparse.Namespace) -> Dict[str, dict]:
    """Tokenize `args.input` into one indexed dataset per key; returns per-key counts."""
    check_args(args)
    tokenizer_config = tokenizer_config_from_args(args)
    tokenizer = load_tokenizer(tokenizer_config)  # fail here, before any output, on a bad tokenizer
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(args.output_prefix)
    if out_dir and not os.path.isdir(out_dir):
        raise UserError(f"--output-prefix {args.output_prefix}: folder {out_dir} does not exist; create it first")
    level, splitter = "document", None
    if args.split_sentences:
        level = "sentence"
        params, source = punkt_parameters(args.punkt, args.lang, args.input, args.json_keys, args.punkt_train_chars)
        splitter = SentenceSplitter(params, keep_newlines=args.keep_newlines)
        print(f"splitting sentences with {source}", file=sys.stderr)
    encoder = Encoder(tokenizer_config, args.json_keys, args.append_eod, args.input, splitter)  # for the workers

    stats = {k: {"documents": 0, "sequences": 0, "tokens": 0} for k in args.json_keys}
    with ExitStack() as stack:
        builders = {}
        for key in args.json_keys:
            bin_path, _ = output_paths(args.output_prefix, key, level)
            try:
                builders[key] = stack.enter_context(IndexedDatasetBuilder(bin_path, dtype))
            except OSError as e:
                raise UserError(f"cannot write {bin_path} ({e.strerror}); pick a writable --output-prefix")
        if args.workers > 1:
            pool = stack.enter_context(
                multiprocessing.Pool(args.workers, initializer=_start_worker, initargs=(encoder,))
            )
            results = pool.imap(_encode_in_worker, _lines(args.input), chunksize=32)
        else:
            encoder.tokenizer = tokenizer
            results = map(encoder.encode, _lines(args.input))

        bar = stack.enter_context(
            # disable=None: a bar on a terminal, only the periodic lines in a log file
            tqdm(unit=" docs", file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
                 disable=True if args.no_progress_bar else None)
        )
        start, n_docs, n_tokens, n_bytes = time.time(), 0, 0, 0
        for status, payload, size in results:
            if status == "error":
                raise UserError(payload)
            for key, (ids, lengths) in payload.items():
                builders[key].add_document(ids, lengths)
                stats[key]["documents"] += 1
                stats[key]["sequences"] += len(lengths)
                stats[key]["tokens"] += len(ids)
                n_tokens += len(ids)
            n_docs += 1
            n_bytes += size
            bar.update(1)
            if n_docs % 256 == 0:
                bar.set_postfix_str(f"{n_tokens / max(time.time() - start, 1e-9):,.0f} tokens/s", refresh=False)
            if n_docs % args.log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                bar.write(f"Processed {n_docs} documents ({n_docs / elapsed:.1f} docs/s, "
                          f"{n_tokens / elapsed:,.0f} tokens/s, {n_bytes / elapsed / 1024 / 1024:.2f} MB/s).",
                          file=sys.stderr)
        if n_docs == 0:
            raise UserError(f"--input {args.input} has no documents (every line is blank)")
        for key, builder in builders.items():
            builder.finalize(output_paths(args.output_prefix, key, level)[1])
    for key, s in stats.items():
        s.update(dtype=dtype.name, prefix=f"{args.output_prefix}_{key}_{level}", level=level)
    return stats


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = preprocess(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    for s in stats.values():
        sentences = f"{s['sequences']} sentences, " if s["level"] == "sentence" else ""
        print(f"wrote {s['prefix']}.bin/.idx: {s['documents']} documents, {sentences}{s['tokens']} tokens "
              f"({s['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
