"""Train a tokenizer on a JSONL corpus, offline, in seconds.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8000 --type gpt2-bpe --output-dir tok/

`--type gpt2-bpe`: GPT-2 style byte-level BPE (HF `tokenizers`), written as `vocab.json` + `merges.txt`
with `<|endoftext|>` (id 0) for GPT2BPETokenizer.
`--type sentencepiece`: a SentencePiece BPE model, written as `tokenizer.model` + `tokenizer.vocab` for
SentencePieceTokenizer. It is trained for an exact round trip: no normalization, whitespace kept as is,
and byte fallback so characters unseen in training still encode. Each line of each document is one
SentencePiece "sentence" (newlines themselves are encoded through byte fallback).
`--type wordpiece`: BERT's WordPiece (HF `tokenizers`), written as `vocab.txt` (one piece per line, `##`
marking word continuations) for BertWordPieceLowerCase, or with `--cased` for BertWordPieceCase. The
special tokens come first: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4 ([BOS]/[EOS] are appended on load).

The input is read in full once to validate it (a bad line is a one-line error naming it), then streamed
to the trainer. Outputs are written to a temporary folder beside `--output-dir` and moved in at the end,
so a failed run leaves nothing behind.
"""

import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser  # noqa: E402

EOD_TOKEN = "<|endoftext|>"
TYPES = ("gpt2-bpe", "sentencepiece", "wordpiece")
OUTPUTS = {"gpt2-bpe": ("vocab.json", "merges.txt"), "sentencepiece": ("tokenizer.model", "tokenizer.vocab"),
           "wordpiece": ("vocab.txt",)}
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def iter_texts(path: str, keys):
    """Yield the text under each of `keys` of each JSONL line; a malformed line is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--input {path}: no such file; pass a JSONL corpus (one JSON object per line)")
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise UserError(f"--input {path} line {n} is not JSON ({e})")
            if not isinstance(doc, dict):
                raise UserError(f"--input {path} line {n} is not a JSON object")
            for key in keys:
                if not isinstance(doc.get(key), str):
                    raise UserError(f"--input {path} line {n} has no string under key {key!r} (--json-keys)")
                yield doc[key]


def check_corpus(path: str, keys) -> int:
    """Validate the whole corpus before training; return its number of characters."""
    try:
        chars = sum(len(t) for t in iter_texts(path, keys))
    except UnicodeDecodeError as e:
        raise UserError(f"--input {path} is not UTF-8 ({e})")
    if chars == 0:
        raise UserError(f"--input {path} has no text under --json-keys {' '.join(keys)}")
    return chars


def train_gpt2_bpe(path, keys, vocab_size, out_dir) -> int:
    """Byte-level BPE; EOD is id 0. Returns the vocab size reached (less than asked on a small corpus)."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is too small for gpt2-bpe: need >= 257 "
                        f"(256 byte symbols + {EOD_TOKEN})")
    tok = ByteLevelBPETokenizer()  # GPT-2's settings: no prefix space, GPT-2 regex, all 256 bytes
    tok.train_from_iterator(iter_texts(path, keys), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOD_TOKEN], show_progress=False)
    tok.save_model(out_dir)
    assert tok.token_to_id(EOD_TOKEN) == 0, "special tokens come first in the trained vocab"
    return tok.get_vocab_size()


def train_sentencepiece(path, keys, vocab_size, out_dir) -> int:
    """SentencePiece BPE with an exact round trip (see module docstring). Returns the vocab size."""
    import sentencepiece as spm

    lines = (line for text in iter_texts(path, keys) for line in text.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
            hard_vocab_limit=False,  # like HF: a small corpus gives a smaller vocab, not an error
            input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:  # e.g. "INTERNAL: src/trainer_interface.cc(638) [check] Vocabulary size..."
        reason = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]
        raise UserError(f"sentencepiece training failed for --vocab-size {vocab_size}: {reason}")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out_dir, "tokenizer.vocab"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):  # the same "piece<TAB>score" listing spm_train writes
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return sp.get_piece_size()


def train_wordpiece(path, keys, vocab_size, out_dir, lowercase: bool = True) -> int:
    """BERT WordPiece; the special tokens take ids 0-4. Returns the vocab size reached."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < len(WORDPIECE_SPECIALS) + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small for wordpiece: need more than the "
                        f"{len(WORDPIECE_SPECIALS)} special tokens")
    tok = BertWordPieceTokenizer(lowercase=lowercase)  # BERT's normalizer and pre-tokenizer, ## prefix
    tok.train_from_iterator(iter_texts(path, keys), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=list(WORDPIECE_SPECIALS), show_progress=False)
    tok.save_model(out_dir)
    assert [tok.token_to_id(t) for t in WORDPIECE_SPECIALS] == list(range(len(WORDPIECE_SPECIALS)))
    return tok.get_vocab_size()


def publish(tmp: str, out_dir: str, names) -> list:
    """Move the finished files from `tmp` into `out_dir` (created if missing); return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in names]
    for name, dst in zip(names, paths):
        os.replace(os.path.join(tmp, name), dst)
    return paths


def flags_for(kind: str, paths, cased: bool = False) -> str:
    """The tokenizer flags for preprocess_data.py and training, quoted for a shell."""
    q = [shlex.quote(p) for p in paths]
    if kind == "gpt2-bpe":
        return f"--tokenizer-type GPT2BPETokenizer --vocab-file {q[0]} --merge-file {q[1]}"
    if kind == "wordpiece":
        return f"--tokenizer-type BertWordPiece{'Case' if cased else 'LowerCase'} --vocab-file {q[0]}"
    return f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {q[0]}"


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])  # a bad flag is one `error:` line
    parser.add_argument("--input", required=True, help="JSONL corpus, one document per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used")
    parser.add_argument("--vocab-size", type=int, required=True, help="target vocab size")
    parser.add_argument("--type", choices=TYPES, required=True, help="which kind of tokenizer")
    parser.add_argument("--output-dir", required=True, help="folder to write the tokenizer files into")
    parser.add_argument("--cased", action="store_true",
                        help="wordpiece: keep case and accents (BertWordPieceCase); default lowercases")
    try:
        args = parser.parse_args(argv)
        out_dir = os.path.abspath(args.output_dir)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"--output-dir {args.output_dir} is a file; pass a folder")
        parent = os.path.dirname(out_dir)
        if not os.path.isdir(parent):
            raise UserError(f"--output-dir {args.output_dir}: parent folder {parent} does not exist")
        if args.vocab_size < 1:
            raise UserError(f"--vocab-size must be positive, got {args.vocab_size}")
        chars = check_corpus(args.input, args.json_keys)
        if args.cased and args.type != "wordpiece":
            raise UserError("--cased only applies to --type wordpiece")
        train = {"gpt2-bpe": train_gpt2_bpe, "sentencepiece": train_sentencepiece,
                 "wordpiece": lambda *a: train_wordpiece(*a, lowercase=not args.cased)}[args.type]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=parent, prefix=".train-tokenizer-") as tmp:
            size = train(args.input, args.json_keys, args.vocab_size, tmp)
            seconds = time.perf_counter() - start
            paths = publish(tmp, args.output_dir, OUTPUTS[args.type])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {args.type} on {chars / 1e6:.2f}M characters in {seconds:.1f} s: vocab size {size}"
          + (f" (asked {args.vocab_size}; the corpus supports no more)" if size < args.vocab_size else ""))
    for p in paths:
        print(f"wrote {p}")
    data_flag = "--split-sentences" if args.type == "wordpiece" else "--append-eod"  # BERT data: sentences
    print(f"preprocess_data.py flags: {flags_for(args.type, paths, args.cased)} {data_flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
