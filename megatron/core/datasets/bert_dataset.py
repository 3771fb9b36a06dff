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
   shuffled with `std::mt19937_64(seed + 1)`. Cost: O(epochs x sentences) Python steps (~0.4 M sentences/s),
   once; a cache hit is a memory map.
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

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.core.datasets.gpt_dataset import (
    SPLIT_NAMES,
    cached_arrays,
    describe,
    parse_blend,
    parse_split,
    split_matrix,
    split_range,
)
from megatron.core.datasets.indexed import IndexedDataset
from megatron.core.errors import UserError

LONG_SENTENCE_LEN = 512  # a document with a longer sentence is skipped (unless it is its only sentence)
_MAX_EPOCHS = np.iinfo(np.int32).max - 1  # Megatron's "until num_samples" epoch bound


@dataclass
class BertDatasetConfig:
    """What the BERT datasets need from the command line."""

    seq_length: int
    """--seq-length: tokens per sample, [CLS] and both [SEP] included; shorter samples are padded."""

    seed: int = 1234
    """--seed: seeds the sample index and, with the sample number, each sample's draws."""

    data_path: Optional[List[str]] = None
    """--data-path: `prefix`, `w1 p1 w2 p2 ...` or `p1 p2 ...` of sentence-level data (`*_text_sentence`)."""

    split: str = "969,30,1"
    """--split: train,valid,test weights over the documents (contiguous ranges)."""

    data_cache_path: Optional[str] = None
    """--data-cache-path: index cache folder; default `<dir of first prefix>/cache/BertDataset_indices`."""

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

    tokenizer_description: str = ""
    """Names the tokenizer (type and files) in the cache key."""

    blend: Tuple[List[str], Optional[List[float]]] = field(init=False, default=None)
    """Parsed data_path: (prefixes, weights or None)."""

    split_matrix: List[Optional[Tuple[float, float]]] = field(init=False, default=None)
    """Parsed split: book-ends per split, None for an empty split."""

    def __post_init__(self) -> None:
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
        for name in ("cls", "sep", "mask", "pad"):  # a UserError naming the fix for a non-WordPiece tokenizer
            getattr(self.tokenizer, name)
        if not self.data_path:
            raise UserError("no training data: pass --data-path PREFIX (sentence-level, from "
                            "preprocess_data.py --split-sentences)")
        self.blend = parse_blend(self.data_path)
        self.split_matrix = split_matrix(parse_split(self.split))

    @property
    def cache_dir(self) -> str:
        if self.data_cache_path:
            return self.data_cache_path
        return os.path.join(os.path.dirname(self.blend[0][0]), "cache", "BertDataset_indices")


# ---------------------------------------------------------------------------------------------------
# The sample index (Megatron's C++ build_mapping, RNGs included)
# ---------------------------------------------------------------------------------------------------
class _MT19937Stream:
    """std::mt19937(seed) raw 32-bit outputs, drawn in blocks (numpy's MT19937 after the same seeding)."""

    def __init__(self, seed: int, block: int = 4096):
        key, pos = np.random.RandomState(seed).get_state()[1:3]  # init_genrand(seed), as std::mt19937
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        self._block, self._buf, self._i = block, [], 0

    def next(self) -> int:
        if self._i == len(self._buf):
            self._buf, self._i = self._bits.random_raw(self._block).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]


_U64 = np.uint64


def mt19937_64(seed: int, n: int) -> np.ndarray:
    """The first n outputs of std::mt19937_64(seed), uint64 [n] (the 64-bit Mersenne Twister, vectorized)."""
    nn, mm = 312, 156
    mask64 = (1 << 64) - 1
    state = [seed & mask64]
    for i in range(1, nn):
        prev = state[-1]
        state.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & mask64)
    mt = np.array(state, dtype=np.uint64)
    upper, lower, matrix_a = _U64(0xFFFFFFFF80000000), _U64(0x7FFFFFFF), _U64(0xB5026F5AA96619E9)

    def mix(hi, lo):  # twist of (upper bits of hi | lower bits of lo)
        x = (hi & upper) | (lo & lower)
        return (x >> _U64(1)) ^ np.where(x & _U64(1), matrix_a, _U64(0))

    out = np.empty(-(-n // nn) * nn, dtype=np.uint64)
    for b in range(out.shape[0] // nn):
        # Three slices so each reads the values the sequential loop would see (old ahead, new behind).
        mt[: nn - mm] = mt[mm:] ^ mix(mt[: nn - mm], mt[1 : nn - mm + 1])
        mt[nn - mm : nn - 1] = mt[: mm - 1] ^ mix(mt[nn - mm : nn - 1], mt[nn - mm + 1 :])
        mt[nn - 1 :] = mt[mm - 1 : mm] ^ mix(mt[nn - 1 :], mt[:1])
        y = mt.copy()
        y ^= (y >> _U64(29)) & _U64(0x5555555555555555)
        y ^= (y << _U64(17)) & _U64(0x71D67FFFEDA60000)
        y ^= (y << _U64(37)) & _U64(0xFFF7EEE000000000)
        y ^= y >> _U64(43)
        out[b * nn : (b + 1) * nn] = y
    return out[:n]


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
    max_num_samples None = one epoch, no limit. See the module docstring for the rules.
    """
    assert max_seq_length > 1 and 0 <= short_seq_prob <= 1 and num_epochs > 0
    docs = np.asarray(docs, dtype=np.int64)
    sizes = np.asarray(sizes)
    ratio = int(round(1.0 / short_seq_prob)) if short_seq_prob > 0 else 0
    rand32 = _MT19937Stream(seed)

    def target() -> int:
        if ratio == 0:
            return max_seq_length
        r = rand32.next()
        return 2 + r % (max_seq_length - 1) if r % ratio == 0 else max_seq_length

    # Documents that yield samples: enough sentences, and no long sentence unless the only one.
    first, last = docs[:-1], docs[1:]
    count = last - first
    long_sentence = np.zeros(len(count), dtype=bool)
    if len(sizes):
        is_long = np.concatenate([[0], np.cumsum(sizes > LONG_SENTENCE_LEN)])  # prefix counts
        long_sentence = (count > 1) & (is_long[last] - is_long[first] > 0)
    used = np.flatnonzero((count >= min_num_sent) & ~long_sentence)
    spans = [(int(first[d]), int(last[d])) for d in used]
    lengths = sizes.tolist() if len(sizes) else []

    def one_epoch(rows: list) -> None:
        for beg, end in spans:
            start, seq_len, num_sent, remain, want = beg, 0, 0, end - beg, target()
            for i in range(beg, end):
                seq_len += lengths[i]
                num_sent += 1
                remain -= 1
                if (seq_len >= want and remain > 1 and num_sent >= min_num_sent) or remain == 0:
                    rows.append((start, i + 1, want))
                    start, seq_len, num_sent, want = i + 1, 0, 0, target()

    limit = math.inf if max_num_samples is None else max_num_samples
    rows: list = []
    one_epoch(rows)
    per_epoch = len(rows)  # 0: nothing usable, the caller reports it
    for _ in range(1, num_epochs if max_num_samples is not None else 1):
        if len(rows) >= limit or per_epoch == 0:
            break
        if ratio == 0:  # no draws: every epoch is the first one again
            rows.extend(rows[:per_epoch])
        else:
            one_epoch(rows)
    n = len(rows)
    dtype = np.uint64 if len(sizes) > np.iinfo(np.uint32).max else np.uint32
    mapping = np.array(rows, dtype=dtype).reshape(n, 3)
    if n > 1:  # Fisher-Yates with mt19937_64(seed + 1), from the last row down
        draws = mt19937_64(seed + 1, n - 1)  # [n - 1]
        bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
        picks = (draws % bounds).tolist()
        perm = list(range(n))
        for i, j in zip(range(n - 1, 0, -1), picks):
            perm[i], perm[j] = perm[j], perm[i]
        mapping = mapping[perm]
    return mapping


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

        ids = np.asarray(document_ids, dtype=np.int64)
        assert len(ids) and np.all(np.diff(ids) == 1), "a split is a non-empty contiguous document range"
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
# Splits and blends
# ---------------------------------------------------------------------------------------------------
def _build_splits(config: BertDatasetConfig, prefix: str, indexed: IndexedDataset,
                  sizes: Sequence[Optional[int]]) -> list:
    """One BertDataset per split of one prefix (None where the split is off, empty or needs no samples)."""
    n = indexed.num_documents
    out = []
    for name, bookends, size in zip(SPLIT_NAMES, config.split_matrix, sizes):
        if bookends is None or size == 0:
            out.append(None)
            continue
        beg, end = split_range(bookends, n)
        if beg == end:
            if size is not None:
                raise UserError(f"the {name} split of {prefix} has no documents ({n} in all); give it more "
                                "data or set its --split weight to 0")
            out.append(None)  # a one-epoch blend part: the blend reports the empty split
            continue
        out.append(BertDataset(indexed, prefix, np.arange(beg, end), size, name, config))
    return out


def build_bert_datasets(config: BertDatasetConfig, num_samples: Sequence[Optional[int]]) -> tuple:
    """(train, valid, test) datasets with at least num_samples[i] samples each (None: one epoch).

    A split is None when its --split weight is 0 or it needs 0 samples; blends as for GPT.
    """
    from megatron.core.datasets.blended import build_blended_splits

    sizes = list(num_samples)
    assert len(sizes) == 3, "num_samples is (train, valid, test)"
    prefixes, weights = config.blend
    indexed = [IndexedDataset(p) for p in prefixes]  # a missing or broken file fails before any work
    if len(prefixes) == 1 and weights is None:
        return tuple(_build_splits(config, prefixes[0], indexed[0], sizes))
    return build_blended_splits(
        prefixes, weights, sizes, config.split_matrix,
        lambda k, part_sizes: _build_splits(config, prefixes[k], indexed[k], part_sizes),
        config.cache_dir, "without a document that makes a BERT sample",
    )
