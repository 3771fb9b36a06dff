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

Speed: lines go to the workers in chunks (with --workers 1, to this process); a worker parses a chunk's
JSON, encodes all its texts with one `tokenize_batch` call (HF tokenizers' `encode_batch`) and sends back
numpy arrays, written in one block per chunk. Each worker is one thread (`TOKENIZERS_PARALLELISM=false`), so
`--workers N` uses N cores. nltk (slow to import) is loaded only with --split-sentences, where Punkt's
splitting (pure Python, in the workers) and not the encoder sets the pace; the sentences are still encoded
in one batch per chunk. bench/preprocess_throughput.py compares the tool with the raw `encode_batch` speed.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.core.datasets.indexed import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.core.tokenizer import (  # noqa: E402
    TokenizerConfig,
    add_tokenizer_args,
    build_tokenizer,
    tokenizer_config_from_args,
)
from megatron.training.cli import ArgumentParser  # noqa: E402

# megatron.core.datasets.sentences imports nltk (~2 s, it pulls in scipy and scikit-learn), so it is
# imported only with --split-sentences; its PUNKT_SOURCES is checked against this copy when it is.
PUNKT_SOURCES = ("auto", "nltk", "input", "untrained")
CHUNK_BYTES = 1 << 18  # input per task: amortizes a batch encode and a write; small keeps workers evenly busy


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])  # a bad flag is one `error:` line
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
Chunk = List[Tuple[int, bytes]]  # (line number, raw line) of consecutive non-blank lines
Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens [T], sequence lengths [S], sequences per doc [D]


class Encoder:
    """Turns a chunk of JSONL lines into {key: (tokens, sequence lengths, sequences per document)}.

    Each string is one sequence, or with a `splitter` one sequence per sentence; empty ones are dropped.
    All texts of a chunk are encoded with one `tokenize_batch` call; a bad line is reported by number, the
    first one in file order.
    """

    def __init__(self, tokenizer_config: TokenizerConfig, keys: List[str], append_eod: bool, input_name: str,
                 dtype: np.dtype, splitter=None):  # splitter: a sentences.SentenceSplitter, or None
        self.tokenizer_config = tokenizer_config
        self.keys = keys
        self.append_eod = append_eod
        self.input_name = input_name
        self.dtype = dtype
        self.splitter = splitter
        self.tokenizer = None

    def start(self) -> None:
        self.tokenizer = build_tokenizer(self.tokenizer_config)

    def parse(self, lineno: int, raw: bytes):
        """One line -> its texts per key ([[str]] in `keys` order), or an error message (str)."""
        where = f"{self.input_name} line {lineno}"
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return f"{where} is not UTF-8 ({e.reason}); re-encode the file as UTF-8"
        except json.JSONDecodeError as e:
            return f"{where} is not valid JSON ({e.msg}, column {e.colno}); fix or remove the line"
        if not isinstance(doc, dict):
            return f"{where} is not a JSON object; each line must be like {{\"text\": \"...\"}}"
        per_key = []
        for key in self.keys:
            if key not in doc:
                have = ", ".join(list(doc)[:5])
                return f"{where} has no key {key!r} (it has: {have}); pass --json-keys with the key that holds the text"
            value = doc[key]
            texts = value if isinstance(value, list) else [value]
            if not all(isinstance(t, str) for t in texts):
                return f"{where}: {key!r} must be a string or a list of strings"
            if self.splitter is not None:
                texts = [sentence for text in texts for sentence in self.splitter.split(text)]
            per_key.append(texts)
        return per_key

    def encode_chunk(self, chunk: Chunk):
        """-> ("ok", {key: Arrays}, documents, bytes) | ("error", message, 0, 0)."""
        docs, error = [], None  # docs: (line number, texts per key) of the lines before the first bad one
        for lineno, raw in chunk:
            parsed = self.parse(lineno, raw)
            if isinstance(parsed, str):
                error = parsed
                break
            docs.append((lineno, parsed))
        try:
            ids = self.tokenizer.tokenize_batch([t for _, per_key in docs for texts in per_key for t in texts])
        except UserError:
            error = self._first_tokenize_error(docs)  # an earlier line than a parse error, if any
        if error is not None:
            return "error", error, 0, 0
        return "ok", self._assemble(docs, ids), len(docs), sum(len(raw) for _, raw in chunk)

    def _first_tokenize_error(self, docs) -> str:
        for lineno, per_key in docs:
            try:
                self.tokenizer.tokenize_batch([t for texts in per_key for t in texts])
            except UserError as e:
                return f"{self.input_name} line {lineno}: {e}"
        raise AssertionError("tokenize_batch failed on the chunk but on none of its documents")

    def _assemble(self, docs, ids: List[List[int]]) -> Dict[str, Arrays]:
        """Concatenate the ids of each key's non-empty sequences, EOD at the end of each non-empty document."""
        out = {key: ([], [], []) for key in self.keys}  # tokens, lengths, sequences per document
        pieces = iter(ids)
        for _, per_key in docs:
            for key, texts in zip(self.keys, per_key):
                tokens, lengths, counts = out[key]
                before = len(lengths)
                for _ in texts:
                    piece = next(pieces)
                    if piece:
                        tokens.extend(piece)
                        lengths.append(len(piece))
                if self.append_eod and len(lengths) > before:
                    tokens.append(self.tokenizer.eod)
                    lengths[-1] += 1
                counts.append(len(lengths) - before)
        return {key: (np.array(tokens, dtype=self.dtype), np.array(lengths, dtype=np.int32),
                      np.array(counts, dtype=np.int64)) for key, (tokens, lengths, counts) in out.items()}


_ENCODER: Encoder = None  # the worker's own Encoder, set by _start_worker


def _start_worker(encoder: Encoder) -> None:
    global _ENCODER
    _ENCODER = encoder
    _ENCODER.start()


def _encode_in_worker(chunk: Chunk):
    return _ENCODER.encode_chunk(chunk)


def _chunks(path: str, log_interval: int) -> Iterator[Chunk]:
    """Non-blank lines in chunks of about CHUNK_BYTES; a chunk also ends after every `log_interval`-th
    document, so the progress lines still come at exact multiples."""
    chunk, size, n_docs = [], 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                chunk.append((lineno, raw))
                size += len(raw)
                n_docs += 1
                if size >= CHUNK_BYTES or n_docs % log_interval == 0:
                    yield chunk
                    chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _one_thread_per_worker():
    """HF tokenizers would spread each batch over every core; one thread per worker makes `--workers N`
    mean N cores (as in the bench's raw side). Set for the run and restored after (the tool is importable)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each call; workers inherit it
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


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
        from megatron.core.datasets import sentences  # nltk: only loaded for sentence splitting

        assert sentences.PUNKT_SOURCES == PUNKT_SOURCES, "keep the --punkt choices in step with sentences.py"
        params, source = sentences.punkt_parameters(args.punkt, args.lang, args.input, args.json_keys,
                                                    args.punkt_train_chars)
        splitter = sentences.SentenceSplitter(params, keep_newlines=args.keep_newlines)
        print(f"splitting sentences with {source}", file=sys.stderr)
    encoder = Encoder(tokenizer_config, args.json_keys, args.append_eod, args.input, dtype, splitter)  # for workers

    stats = {k: {"documents": 0, "sequences": 0, "tokens": 0} for k in args.json_keys}
    with ExitStack() as stack:
        stack.enter_context(_one_thread_per_worker())
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
            results = pool.imap(_encode_in_worker, _chunks(args.input, args.log_interval))  # in order
        else:
            encoder.tokenizer = tokenizer
            results = map(encoder.encode_chunk, _chunks(args.input, args.log_interval))

        bar = stack.enter_context(
            # disable=None: a bar on a terminal, only the periodic lines in a log file
            tqdm(unit=" docs", file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
                 disable=True if args.no_progress_bar else None)
        )
        start, n_docs, n_tokens, n_bytes = time.time(), 0, 0, 0
        for status, payload, docs, size in results:
            if status == "error":
                raise UserError(payload)
            for key, (tokens, lengths, counts) in payload.items():
                builders[key].add_documents(tokens, lengths, counts)
                stats[key]["documents"] += docs
                stats[key]["sequences"] += lengths.size
                stats[key]["tokens"] += tokens.size
                n_tokens += tokens.size
            n_docs += docs
            n_bytes += size
            bar.set_postfix_str(f"{n_tokens / max(time.time() - start, 1e-9):,.0f} tokens/s", refresh=False)
            bar.update(docs)
            if n_docs % args.log_interval == 0:  # chunks end at these multiples (_chunks)
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
    try:
        stats = preprocess(build_parser().parse_args(argv))
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
