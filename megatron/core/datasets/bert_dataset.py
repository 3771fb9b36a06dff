"""BERT pretraining samples from sentence-level data, with Megatron's rules: segment pairs, SOP, masking.

Input: an indexed dataset written by `preprocess_data.py --split-sentences` (one sequence per sentence,
documents as groups). The split unit is the document. Two steps, both identical to megatron-core's
`BERTMaskedWordPieceDataset` (same RNGs, same call order; the tests compare against megatron-core):

1. The **sample index** `[N, 3]` (first sentence, end sentence, target length), built once per split and
   cached (Megatron's C++ `build_mapping`, here in numpy/Python). Per epoch, per document of the split:
   skip documents with fewer than 2 sentences (1 without the binary head) and, among documents with more
   than one sentence, those holding a sentence longer than 512 tokens; accumulate sentences until the
   running length reaches the target (and at least 2 sentences, and more than one sentence is left) or
   the document ends. Target = s - 3, or with probability `short_seq_prob` uniform in [2, s - 3]; drawn
   from `std::mt19937(seed)`. Epochs repeat until N >= num_samples, whole epochs only. The rows are then
   shuffled with `std::mt19937_64(seed + 1)`. Cost: one Python step per sample (the sample's end is a
   bisection of the document's prefix sums) and one per shuffle swap, about 20 bytes a row at the peak
   (docs/bert.md has the measurement); built once, on rank 0 only, and memory-mapped from the cache by the
   other ranks and later runs.
2. **`ds[k]`**, deterministic per k (`numpy.random.RandomState((seed + k) % 2**32)`): split the sample's
   sentences at a random point into A | B, swap them with probability 1/2 (sentence-order prediction,
   `is_random` = 1 when swapped), trim the longer segment from a random end until A + B fit the target,
   lay out `[CLS] A [SEP] B [SEP]`, then mask (below) and pad to s.

Masking (`_masked_lm`): candidates are words (a `##` piece joins the word before it, with
`whole_word_masking`) or single pieces; n = min(p * target, max(1, round(p * len))) tokens, p =
`masked_lm_prob`; candidates are visited in random order, each as the start of an n-gram of 1..max_ngram
words with P(n) proportional to 1/n (shrunk until it fits), skipping overlaps; each chosen token becomes
`[MASK]` (80%), a random id of the vocab (10%) or stays (10%).

`ds[k]` = {text int64 [s], types int64 [s], labels int64 [s] (-1 where not masked), loss_mask float32 [s],
padding_mask bool [s] (True = padding; Megatron's is the opposite), is_random int64 []}.

Glossary: s = seq_length, N = samples in the index, A/B = the two segments.
"""

import array
import itertools
import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron.core.datasets.builder import build_splits
from megatron.core.datasets.common import DatasetConfig, cached_arrays, describe
from megatron.core.datasets.indexed import IndexedDataset
from megatron.core.datasets.mt19937 import MT19937, MT19937_64
from megatron.core.errors import UserError

LONG_SENTENCE_LEN = 512  # a document with a longer sentence is skipped (unless it is its only sentence)
_MAX_EPOCHS = np.iinfo(np.int32).max - 1  # Megatron's "until num_samples" epoch bound


@dataclass
class BertDatasetConfig(DatasetConfig):
    """What the BERT datasets need from the command line, beyond DatasetConfig's shared fields.

    For BERT, seq_length counts [CLS] and both [SEP]; shorter samples are padded. The seed seeds the
    sample index and, with the sample number, each sample's draws. --data-path names sentence-level data
    (`*_text_sentence`); --split divides documents (contiguous ranges). The cache defaults to
    `<dir of first prefix>/cache/BertDataset_indices`.
    """

    name = "BERT"
    cache_folder = "BertDataset_indices"
    no_data_hint = "(sentence-level, from preprocess_data.py --split-sentences)"

    masked_lm_prob: float = 0.15
    """--mask-prob: share of a sample's tokens to predict."""

    short_seq_prob: float = 0.1
    """--short-seq-prob: probability that a sample's target length is drawn in [2, s - 3]."""

    max_ngram: int = 3
    """Longest masked span in words (Megatron's BERT uses 3, P(n) ~ 1/n); 1 = no n-gram masking."""

    whole_word_masking: bool = True
    """Mask whole words: a `##` piece is masked together with the word it continues."""

    binary_head: bool = True
    """Sentence-order prediction (--bert-no-binary-head turns it off: one-sentence documents are used and
    A/B are never swapped)."""

    tokenizer: Any = None
    """The tokenizer object: `cls`, `sep`, `mask`, `pad`, `vocab_size`, `inv_vocab` (WordPiece)."""

    def _check(self) -> None:
        if not isinstance(self.seq_length, int) or self.seq_length < 5:
            raise UserError(f"--seq-length must be an integer >= 5 for BERT ([CLS] A [SEP] B [SEP]), "
                            f"got {self.seq_length}")
        if not 0 <= self.seed < 2**31 - 1:
            raise UserError(f"--seed must be in [0, 2**31 - 1) for BERT data, got {self.seed}")
        if not 0 < self.masked_lm_prob < 1:
            raise UserError(f"--mask-prob must be in (0, 1), got {self.masked_lm_prob}")
        if not 0 <= self.short_seq_prob <= 1:
            raise UserError(f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        if not isinstance(self.max_ngram, int) or self.max_ngram < 1:
            raise UserError(f"max_ngram must be an integer >= 1, got {self.max_ngram}")
        if self.tokenizer is None:
            raise UserError("the BERT dataset needs the tokenizer (a WordPiece vocab)")
        for special in ("cls", "sep", "mask", "pad"):  # a UserError naming the fix for a non-WordPiece tokenizer
            getattr(self.tokenizer, special)


# ---------------------------------------------------------------------------------------------------
# The sample index (Megatron's C++ build_mapping, RNGs included)
# ---------------------------------------------------------------------------------------------------
_BLOCK_SENTENCES = 1 << 22  # sentences whose prefix sums are held at once (32 MB of int64)
_TARGET_BLOCK = 1 << 16  # target lengths drawn per numpy call
_SHUFFLE_BLOCK = 1 << 16  # Fisher-Yates picks drawn per numpy call


def _targets(seed: int, ratio: int, max_len: int) -> Iterator[int]:
    """Megatron's get_target_sample_len per draw r of std::mt19937(seed): 2 + r % (max_len - 1) when
    r % ratio == 0, else max_len."""
    rng = MT19937(seed)

    def blocks():
        while True:
            r = rng.next(_TARGET_BLOCK)  # [block] uint64 holding 32-bit values
            yield np.where(r % ratio == 0, 2 + r % (max_len - 1), max_len).tolist()

    return itertools.chain.from_iterable(blocks())  # C-level iteration within a block


def _blocks(docs: np.ndarray) -> List[Tuple[int, int]]:
    """[d0, d1) document ranges of about _BLOCK_SENTENCES sentences each (a longer document alone)."""
    out, d = [], 0
    while d < len(docs) - 1:
        e = max(d + 1, int(np.searchsorted(docs, docs[d] + _BLOCK_SENTENCES, side="right")) - 1)
        out.append((d, e))
        d = e
    return out


def _block_tables(docs: np.ndarray, sizes: np.ndarray, d0: int, d1: int, min_num_sent: int):
    """(spans, cum, base) for documents [d0, d1): spans = [(first, end)] of the documents that yield
    samples, as sentence numbers relative to base = docs[d0]; cum = int64 [n + 1] prefix sums of the
    block's sentence lengths, as a memoryview (the hot loop indexes it with Python ints)."""
    base = int(docs[d0])
    first, last = docs[d0:d1] - base, docs[d0 + 1 : d1 + 1] - base  # [D_b] each
    cum = np.zeros(int(last[-1]) + 1, dtype=np.int64)  # [n + 1]
    np.cumsum(sizes[base : base + len(cum) - 1], out=cum[1:])
    is_long = np.zeros(len(cum), dtype=np.int64)  # [n + 1] prefix counts of sentences > 512 tokens
    np.cumsum(sizes[base : base + len(cum) - 1] > LONG_SENTENCE_LEN, out=is_long[1:])
    count = last - first
    long_sentence = (count > 1) & (is_long[last] - is_long[first] > 0)
    used = np.flatnonzero((count >= min_num_sent) & ~long_sentence)
    return list(zip(first[used].tolist(), last[used].tolist())), memoryview(cum), base


def _walk_block(rows: array.array, spans, cum, base: int, min_num_sent: int, next_target) -> None:
    """Append one epoch's samples of one block to rows (flat first, end, target).

    A sample starting at sentence s with target t ends after the first sentence e - 1 where the running
    length reaches t, at least min_num_sent sentences are taken and more than one sentence is left in the
    document; else at the document end. The first e reaching the length is a bisection of the prefix sums.
    """
    extend = rows.extend
    for s, end in spans:
        t = next_target()  # one draw when a document starts ...
        while True:
            e = bisect_left(cum, cum[s] + t, s + 1, end)  # first e with sum(sizes[s:e]) >= t, or end
            if e < s + min_num_sent:
                e = s + min_num_sent
            if e > end - 2:  # would leave a single sentence (or none): take the rest of the document
                e = end
            extend((s + base, e + base, t))
            t = next_target()  # ... and one after every sample, the document's last included
            if e == end:
                break
            s = e


def build_sample_mapping(
    docs: np.ndarray,
    sizes: np.ndarray,
    num_epochs: int,
    max_num_samples: Optional[int],
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    min_num_sent: int,
) -> np.ndarray:
    """Megatron's `helpers.build_mapping`: [N, 3] (first sentence, end sentence, target length), shuffled.

    docs: int64 [D + 1] sentence boundaries of the split's documents; sizes: int32 sentence lengths;
    max_num_samples None = one epoch, no limit. See the module docstring for the rules. Rows grow in a
    compact `array.array` (12 bytes a row, uint32 as Megatron's unless there are more than 2**32
    sentences) and are shuffled in place, so a build needs about 20 bytes a row at its peak; the loop
    runs once per sample (a bisection within the document), not once per sentence.
    """
    assert max_seq_length > 1 and 0 <= short_seq_prob <= 1 and num_epochs > 0
    docs = np.asarray(docs, dtype=np.int64)
    sizes = np.asarray(sizes)
    wide = len(sizes) > np.iinfo(np.uint32).max
    dtype, code = (np.uint64, "Q") if wide else (np.uint32, "I")
    assert array.array(code).itemsize == np.dtype(dtype).itemsize
    ratio = int(round(1.0 / short_seq_prob)) if short_seq_prob > 0 else 0
    if ratio == 0:
        next_target = itertools.repeat(max_seq_length).__next__
    else:
        next_target = _targets(seed, ratio, max_seq_length).__next__

    blocks = _blocks(docs) if len(docs) > 1 else []
    single = [_block_tables(docs, sizes, *blocks[0], min_num_sent)] if len(blocks) == 1 else None
    limit = math.inf if max_num_samples is None else max_num_samples
    rows = array.array(code)
    per_epoch = 0
    for epoch in range(num_epochs if max_num_samples is not None else 1):
        if len(rows) // 3 >= limit or (epoch > 0 and per_epoch == 0):
            break
        if epoch > 0 and ratio == 0:  # no draws: every epoch is the first one again
            rows.extend(rows[: 3 * per_epoch])
            continue
        for tables in single or (_block_tables(docs, sizes, d0, d1, min_num_sent) for d0, d1 in blocks):
            _walk_block(rows, *tables, min_num_sent, next_target)
        if epoch == 0:
            per_epoch = len(rows) // 3  # 0: nothing usable, the caller reports it
    mapping = np.frombuffer(rows, dtype=dtype).reshape(-1, 3) if len(rows) else np.zeros((0, 3), dtype)
    _shuffle_rows(mapping, seed + 1)
    return mapping


def _shuffle_rows(mapping: np.ndarray, seed: int) -> None:
    """Megatron's Fisher-Yates with std::mt19937_64(seed): for i = n-1 .. 1, swap rows i and draw % (i+1).

    The swaps run on a permutation (4 or 8 bytes a row), applied to the rows one column at a time."""
    n = mapping.shape[0]
    if n < 2:
        return
    perm = np.arange(n, dtype=np.uint32 if n <= np.iinfo(np.uint32).max else np.uint64)  # [n]
    p = memoryview(perm)
    rand64 = MT19937_64(seed)
    for hi in range(n - 1, 0, -_SHUFFLE_BLOCK):  # i = hi, hi-1, ..., down to max(lo, 1)
        lo = max(hi - _SHUFFLE_BLOCK, 0)
        bounds = np.arange(hi + 1, lo + 1, -1, dtype=np.uint64)  # [hi - lo] i + 1 for i = hi .. lo+1
        picks = (rand64.next(hi - lo) % bounds).tolist()
        for i, j in zip(range(hi, lo, -1), picks):
            p[i], p[j] = p[j], p[i]
    for c in range(3):
        mapping[:, c] = mapping[perm, c]


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------
class BertDataset:
    """Samples of one split (a contiguous range of documents) of one sentence-level indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        prefix: str,
        document_ids: np.ndarray,
        num_samples: Optional[int],
        split_name: str,
        config: BertDatasetConfig,
    ) -> None:
        ids = np.asarray(document_ids, dtype=np.int64)
        if not len(ids):
            raise UserError(f"the {split_name} split of {prefix} has no documents ({indexed.num_documents} in "
                            "all); give it more data or set its --split weight to 0")
        assert np.all(np.diff(ids) == 1), "a split is a contiguous document range"
        self.indexed = indexed
        self.prefix = prefix
        self.split_name = split_name
        self.num_samples = num_samples
        self.config = config
        tok = config.tokenizer
        self.cls, self.sep, self.mask_id, self.pad = tok.cls, tok.sep, tok.mask, tok.pad
        self.vocab_size = tok.vocab_size
        inv_vocab = getattr(tok, "inv_vocab", None) or {i: "" for i in range(self.vocab_size)}
        self.token_lookup = np.array(list(inv_vocab.keys()), dtype=np.int64)  # random replacements
        self.continues_word = np.zeros(self.vocab_size, dtype=bool)  # [vocab] a `##` piece
        for i, piece in inv_vocab.items():
            self.continues_word[i] = piece.startswith("##")

        docs = np.asarray(indexed.document_indices[np.append(ids, ids[-1] + 1)], dtype=np.int64)  # [D + 1]
        min_sentences = 2 if config.binary_head else 1
        self.description = {
            "class": type(self).__name__,
            "dataset_path": prefix,
            "num_samples": num_samples,
            "index_split": split_name,
            "split": config.split,
            "documents": [int(ids[0]), int(ids[-1]) + 1],
            "num_sentences": int(docs[-1] - docs[0]),
            "random_seed": config.seed,
            "sequence_length": config.seq_length,
            "short_seq_prob": config.short_seq_prob,
            "binary_head": config.binary_head,
            "tokenizer": config.tokenizer_description,
        }
        text, md5 = describe(self.description)
        arrays = cached_arrays(
            config.cache_dir, f"{md5}-BertDataset-{split_name}", text, ("sample_index",),
            lambda: {"sample_index": build_sample_mapping(
                docs, indexed.sequence_lengths, _MAX_EPOCHS, num_samples, config.seq_length - 3,
                config.short_seq_prob, config.seed, min_sentences)},
        )
        self.sample_index = arrays["sample_index"]  # [N, 3] (first sentence, end sentence, target length)
        if len(self.sample_index) == 0:
            raise UserError(
                f"the {split_name} split of {prefix} ({len(ids)} documents) has no document that makes a "
                f"sample: BERT needs documents of >= {min_sentences} sentences with none over "
                f"{LONG_SENTENCE_LEN} tokens; was the data preprocessed with --split-sentences?"
            )

    def __len__(self) -> int:
        return self.sample_index.shape[0]

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        cfg = self.config
        beg, end, target = (int(x) for x in self.sample_index[idx])
        assert target <= cfg.seq_length - 3
        rng = np.random.RandomState((cfg.seed + idx) % 2**32)
        sentences = [self.indexed.get(i) for i in range(beg, end)]
        self._check_vocab(sentences)

        # Segments A | B, maybe swapped (sentence-order prediction).
        pivot, is_random = len(sentences), False
        if cfg.binary_head:
            assert len(sentences) > 1, "the sample index only holds samples of >= 2 sentences"
            pivot = rng.randint(low=1, high=len(sentences)) if len(sentences) >= 3 else 1
            is_random = rng.random() < 0.5
        a = np.concatenate(sentences[:pivot]).astype(np.int64)
        b = np.concatenate(sentences[pivot:]).astype(np.int64) if pivot < len(sentences) else np.zeros(0, np.int64)
        if is_random:
            a, b = b, a

        # Trim the longer segment (B on a tie) from a random end until both fit the target.
        (a0, a1), (b0, b1) = (0, len(a)), (0, len(b))
        while (a1 - a0) + (b1 - b0) > target:
            front = rng.random() < 0.5
            if a1 - a0 > b1 - b0:
                a0, a1 = (a0 + 1, a1) if front else (a0, a1 - 1)
            else:
                b0, b1 = (b0 + 1, b1) if front else (b0, b1 - 1)
        a, b = a[a0:a1], b[b0:b1]

        tokens = [self.cls, *a.tolist(), self.sep]  # [CLS] A [SEP] B [SEP]
        n_first = len(tokens)
        if len(b):
            tokens += [*b.tolist(), self.sep]
        masked, positions, labels = self._masked_lm(tokens, target, rng)

        s, n = cfg.seq_length, len(tokens)
        text = np.full(s, self.pad, dtype=np.int64)  # [s]
        text[:n] = masked
        types = np.zeros(s, dtype=np.int64)  # [s]
        types[n_first:n] = 1
        label = np.full(s, -1, dtype=np.int64)  # [s]
        label[positions] = labels
        loss_mask = np.zeros(s, dtype=np.float32)  # [s]
        loss_mask[positions] = 1.0
        padding_mask = np.zeros(s, dtype=bool)  # [s] True = padding
        padding_mask[n:] = True
        return {"text": text, "types": types, "labels": label, "loss_mask": loss_mask,
                "padding_mask": padding_mask, "is_random": np.array(int(is_random), dtype=np.int64)}

    def _check_vocab(self, sentences: List[np.ndarray]) -> None:
        hi = max((int(x.max()) for x in sentences if len(x)), default=0)
        if hi >= self.vocab_size:
            raise UserError(
                f"token id {hi} in {self.prefix} is outside this tokenizer's vocab of {self.vocab_size}: the "
                "data was probably preprocessed with another tokenizer; re-run tools/preprocess_data.py "
                "--split-sentences with the tokenizer flags of this run"
            )

    def _masked_lm(self, tokens: List[int], target: int, rng: np.random.RandomState):
        """(masked tokens, positions, original ids) as megatron-core's `_create_masked_lm_predictions`."""
        cfg = self.config
        # Candidates: lists of positions; a `##` piece joins the previous candidate with whole-word masking
        # (even across a [SEP] when B starts mid-word after trimming, as in Megatron).
        candidates: List[List[int]] = []
        for i, t in enumerate(tokens):
            if t == self.cls or t == self.sep:
                continue
            if self.continues_word[t] and cfg.whole_word_masking and candidates:
                candidates[-1].append(i)
            else:
                candidates.append([i])
        n_mask = min(cfg.masked_lm_prob * target, max(1, int(round(len(tokens) * cfg.masked_lm_prob))))

        # P(n) ~ 1/n over n = 1..max_ngram, as the cdf numpy's choice() builds (same floats, same draw).
        nvals = np.arange(cfg.max_ngram, dtype=np.int64) + 1
        p = 1.0 / nvals
        p = p / p.sum(keepdims=True)  # Megatron's nprobs
        p = p / p.sum(keepdims=True)  # renormalized over a candidate's n-grams (always max_ngram of them)
        cdf = p.cumsum()
        cdf /= cdf[-1]

        order = list(range(len(candidates)))
        rng.shuffle(order)
        out = list(tokens)
        chosen: List[Tuple[int, int]] = []  # (position, original id)
        covered = set()
        for c in order:
            if len(chosen) >= n_mask:
                break
            n = int(nvals[cdf.searchsorted(rng.random_sample(), side="right")])
            while True:  # shrink the n-gram until it fits the budget
                span = [i for cand in candidates[c : c + n] for i in cand]
                n -= 1
                if n_mask >= len(chosen) + len(span):
                    break
                if n == 0:
                    span = None
                    break
            if span is None or any(i in covered for i in span):
                continue
            for i in span:
                covered.add(i)
                if rng.random() < 0.8:
                    out[i] = self.mask_id
                elif rng.random() >= 0.5:
                    out[i] = int(self.token_lookup[rng.randint(0, len(self.token_lookup))])
                chosen.append((i, tokens[i]))
        chosen.sort()
        return out, [i for i, _ in chosen], [t for _, t in chosen]


# ---------------------------------------------------------------------------------------------------
# Splits and blends (builder.build_splits, as for GPT; --split divides documents)
# ---------------------------------------------------------------------------------------------------
def build_bert_datasets(config: BertDatasetConfig, num_samples: Sequence[Optional[int]]) -> tuple:
    """(train, valid, test) datasets with at least num_samples[i] samples each (None: one epoch).

    A split is None when its --split weight is 0 or it needs 0 samples; blends as for GPT.
    """
    return build_splits(config, num_samples, BertDataset, lambda indexed: indexed.num_documents,
                        config.tokenizer.vocab_size, "without a document that makes a BERT sample")
