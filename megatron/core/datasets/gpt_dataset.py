"""GPT pretraining samples cut from a token stream, with Megatron's index rules.

A split of an indexed dataset (a contiguous range of sequence ids) is repeated for E epochs, shuffled,
and read as one token stream; sample j is `seq_length + 1` tokens starting at token `j * seq_length`
(consecutive samples share one token, so every token is a label exactly once). Three arrays say where
each sample lies; they are identical to Megatron-LM's (same RNG, same call order), so a run sees the
same samples in the same order as Megatron on the same data and seed:

    document_index [E * n] int32   the split's sequence ids, E copies, shuffled with RandomState(seed)
    sample_index   [N + 1, 2]      (position in document_index, token offset) where sample j starts
    shuffle_index  [N] uint32      the order samples are served in; same RandomState, after the above

If E > 1 and the last epoch contributes fewer than 80% of an epoch's samples, that epoch is shuffled
apart from the others (document and shuffle index), so a partial epoch does not favour some documents.

The arrays are cached as `.npy` under `<cache>/{md5}-GPTDataset-{split}-*.npy` (md5 of a JSON
description of everything they depend on), written atomically and memory-mapped on later runs; with
several ranks, rank 0 builds them and the others map its files (common.py, shared with BERT).

Glossary: s = seq_length, E = epochs, n = sequences in the split, N = samples built.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from megatron.core.datasets.builder import build_splits
from megatron.core.datasets.common import DatasetConfig, cached_arrays, describe
from megatron.core.errors import UserError

_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass
class GPTDatasetConfig(DatasetConfig):
    """What the GPT datasets need from the command line, beyond DatasetConfig's shared fields.

    For GPT, seq_length counts a sample's inputs: each sample reads seq_length + 1 tokens (inputs and
    labels). The seed seeds the document and sample shuffles (numpy RandomState). --split divides
    sequences; mock data always splits its documents evenly ("1,1,1"), as Megatron does. The cache
    defaults to `<dir of first prefix>/cache/GPTDataset_indices`; mock data is not cached.
    """

    name = "GPT"
    cache_folder = "GPTDataset_indices"
    no_data_hint = "(or --mock-data)"

    mock: bool = False
    """--mock-data: synthetic documents instead of files (for tests and smoke runs)."""

    eod_token: int = 0
    """End-of-document id of the tokenizer (resets positions / masks loss when asked)."""

    vocab_size: Optional[int] = None
    """Tokenizer vocab size (unpadded); every token read is checked to be below it. None = no check."""

    reset_position_ids: bool = False
    """--reset-position-ids: positions restart at 0 after each EOD."""

    eod_mask_loss: bool = False
    """--eod-mask-loss: no loss on EOD input tokens."""

    mock_num_documents: int = 1000
    """Documents in the synthetic corpus when mock is set."""

    def _check(self) -> None:
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise UserError(f"--seq-length must be a positive integer, got {self.seq_length}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.vocab_size is not None:
            if self.vocab_size < 1:
                raise UserError(f"vocab size must be positive, got {self.vocab_size}")
            if not 0 <= self.eod_token < self.vocab_size:
                raise UserError(f"EOD id {self.eod_token} is outside the vocab of {self.vocab_size}")
        if self.mock:
            if self.data_path:
                raise UserError("--mock-data and --data-path exclude each other; drop one")
            if self.vocab_size is None:
                raise UserError("mock data needs the tokenizer's vocab size")
            self.split = "1,1,1"

    def reads_files(self) -> bool:
        return not self.mock


# ---------------------------------------------------------------------------------------------------
# Index construction (pure functions of lengths, ids, seed)
# ---------------------------------------------------------------------------------------------------
def num_epochs_for(tokens_per_epoch: int, num_samples: Optional[int], s: int) -> int:
    """Smallest E with E * tokens_per_epoch >= num_samples * s + 1 (1 when num_samples is None)."""
    if num_samples is None:
        return 1
    return max(1, -(-(num_samples * s + 1) // tokens_per_epoch))


def build_document_index(
    ids: np.ndarray, epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """E copies of `ids`, shuffled; the last epoch on its own when `separate_last`."""
    if separate_last and epochs > 1:
        first = build_document_index(ids, epochs - 1, rng, False)
        last = build_document_index(ids, 1, rng, False)
        return np.concatenate([first, last])
    doc = np.tile(np.asarray(ids, dtype=np.int32), epochs)  # [E * n]
    rng.shuffle(doc)
    return doc


def build_sample_index(
    lengths: np.ndarray, document_index: np.ndarray, s: int, tokens_total: int
) -> np.ndarray:
    """[N + 1, 2] (position in document_index, offset) of each sample start, N = (tokens_total - 1) // s.

    Sample j reads tokens [j*s, j*s + s] of the stream; its start is recorded in the (non-empty)
    document holding stream token j*s, which is where the previous sample's last token lies. The first
    row is (0, 0) even when that document is empty (as in Megatron's C++ walk).
    """
    n_samples = (tokens_total - 1) // s
    doc_lengths = np.asarray(lengths)[document_index].astype(np.int64)  # [E * n]
    ends = np.cumsum(doc_lengths)  # stream position just past each document
    assert ends[-1] == tokens_total
    starts = np.arange(n_samples + 1, dtype=np.int64) * s  # [N + 1] first stream token of each sample
    where = np.searchsorted(ends, starts, side="right")  # first document ending after the token
    offsets = starts - (ends[where] - doc_lengths[where])
    index_max = max(document_index.shape[0], int(np.max(lengths)) if len(lengths) else 0)
    dtype = np.int32 if index_max <= np.iinfo(np.int32).max else np.int64
    sample_index = np.stack([where, offsets], axis=1).astype(dtype)  # [N + 1, 2]
    sample_index[0] = 0
    return sample_index


def build_shuffle_index(first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """arange(total) with [0, first) and [first, total) shuffled separately (in that order)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def build_indices(
    lengths: np.ndarray, ids: np.ndarray, num_samples: Optional[int], s: int, seed: int
) -> Dict[str, np.ndarray]:
    """Megatron's three GPT index arrays for the split `ids` of a dataset with `lengths`."""
    tokens_per_epoch = int(np.sum(np.asarray(lengths)[ids], dtype=np.int64))
    epochs = num_epochs_for(tokens_per_epoch, num_samples, s)
    separate_last, before_last = False, None
    if epochs > 1:
        before_last = ((epochs - 1) * tokens_per_epoch - 1) // s
        from_last = num_samples - before_last
        per_epoch = (tokens_per_epoch - 1) // s
        assert 0 <= from_last <= per_epoch + 1
        separate_last = from_last < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(ids, epochs, rng, separate_last)
    sample_index = build_sample_index(lengths, document_index, s, epochs * tokens_per_epoch)
    n = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(before_last if separate_last else n, n, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------
class GPTDataset:
    """Samples of one split of one indexed dataset; `ds[k]` is the k-th sample in training order.

    `indexed` is an IndexedDataset (or anything with `sequence_lengths` and `get`), `sequence_ids` the
    split's contiguous ids, `prefix` None for in-memory data (then nothing is cached).

    `ds[k]` = {tokens int64 [s], labels int64 [s], loss_mask float32 [s], position_ids int64 [s]}.
    """

    def __init__(
        self,
        indexed,
        prefix: Optional[str],
        sequence_ids: np.ndarray,
        num_samples: Optional[int],
        split_name: str,
        config: GPTDatasetConfig,
    ) -> None:
        self.indexed = indexed
        self.prefix = prefix
        self.split_name = split_name
        self.num_samples = num_samples
        self.config = config
        s = config.seq_length
        ids = np.asarray(sequence_ids, dtype=np.int32)
        tokens_per_epoch = int(np.sum(indexed.sequence_lengths[ids], dtype=np.int64))
        if tokens_per_epoch <= 1:
            raise UserError(
                f"the {split_name} split of {prefix or 'the mock data'} has {len(ids)} sequences and "
                f"{tokens_per_epoch} tokens, too few to cut samples from; give it more data or set its "
                "--split weight to 0"
            )
        self.description = {
            "class": type(self).__name__,
            "dataset_path": prefix,
            "num_samples": num_samples,
            "index_split": split_name,
            "split": config.split,
            "sequences": [int(ids[0]), int(ids[-1]) + 1] if len(ids) else [0, 0],
            "num_sequences": len(ids),
            "tokens_per_epoch": tokens_per_epoch,
            "random_seed": config.seed,
            "sequence_length": s,
            "tokenizer": config.tokenizer_description,
        }
        text, md5 = describe(self.description)
        arrays = cached_arrays(
            config.cache_dir if prefix is not None else None,
            f"{md5}-GPTDataset-{split_name}",
            text,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: build_indices(indexed.sequence_lengths, ids, num_samples, s, config.seed),
        )
        self.document_index = arrays["document_index"]  # [E * n] int32
        self.sample_index = arrays["sample_index"]  # [N + 1, 2]
        self.shuffle_index = arrays["shuffle_index"]  # [N]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def read(self, k: int) -> np.ndarray:
        """The s + 1 tokens of the k-th sample (int64), spanning documents as needed."""
        j = int(self.shuffle_index[k])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        doc = self.document_index
        get = self.indexed.get
        if d0 == d1:
            parts = [get(int(doc[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(doc[d0]), o0)]
            parts += [get(int(doc[d])) for d in range(d0 + 1, d1)]
            parts.append(get(int(doc[d1]), 0, o1 + 1))
        x = np.concatenate(parts).astype(np.int64)  # [s + 1]
        assert x.shape[0] == self.config.seq_length + 1, (x.shape, k)
        return x

    def _check_vocab(self, x: np.ndarray) -> None:
        v = self.config.vocab_size
        if v is None or x.size == 0:
            return
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= v:
            bad = hi if hi >= v else lo
            raise UserError(
                f"token id {bad} in {self.prefix} is outside this tokenizer's vocab of {v}: the data was "
                "probably preprocessed with another tokenizer; re-run tools/preprocess_data.py with the "
                "tokenizer flags of this run"
            )

    def __getitem__(self, k: int) -> Dict[str, np.ndarray]:
        x = self.read(k)  # [s + 1]
        self._check_vocab(x)
        tokens, labels = x[:-1], x[1:]  # [s], [s]
        loss_mask, position_ids = masks_and_positions(
            tokens, self.config.eod_token, self.config.reset_position_ids, self.config.eod_mask_loss
        )
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def masks_and_positions(tokens: np.ndarray, eod: int, reset_position_ids: bool, eod_mask_loss: bool):
    """(loss_mask float32 [s], position_ids int64 [s]) for a left-to-right LM."""
    s = tokens.shape[0]
    loss_mask = np.ones(s, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = np.arange(s, dtype=np.int64)
    if reset_position_ids:
        # Each position counts from the token after the last EOD before it (the EOD closes its document).
        restart = np.zeros(s, dtype=np.int64)
        after_eod = np.flatnonzero(tokens[:-1] == eod) + 1
        restart[after_eod] = after_eod
        position_ids -= np.maximum.accumulate(restart)
    return loss_mask, position_ids


class MockIndexedDataset:
    """An in-memory stand-in for IndexedDataset: random documents, each ending in EOD.

    Lengths are uniform in [1, max_length], ids uniform over the vocab minus EOD; all drawn from
    numpy's default_rng(seed), so the corpus is a pure function of its arguments.
    """

    def __init__(self, num_documents: int, vocab_size: int, eod: int, seed: int, max_length: int = 256):
        assert vocab_size >= 2, "mock data needs at least one id besides EOD"
        rng = np.random.default_rng(seed)
        self.sequence_lengths = rng.integers(1, max_length + 1, size=num_documents).astype(np.int32)  # [n]
        self.sequence_pointers = np.concatenate([[0], np.cumsum(self.sequence_lengths[:-1], dtype=np.int64)])
        total = int(np.sum(self.sequence_lengths, dtype=np.int64))
        ids = rng.integers(0, vocab_size - 1, size=total)
        ids[ids >= eod] += 1  # skip the EOD id
        ids[self.sequence_pointers + self.sequence_lengths - 1] = eod
        self.tokens = ids.astype(np.int64)  # [total]
        self.document_indices = np.arange(num_documents + 1, dtype=np.int64)
        self.dtype = self.tokens.dtype

    @classmethod
    def for_config(cls, config: GPTDatasetConfig) -> "MockIndexedDataset":
        return cls(config.mock_num_documents, config.vocab_size, config.eod_token, config.seed)

    def __len__(self) -> int:
        return self.sequence_lengths.shape[0]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        assert 0 <= offset and offset + length <= n
        p = int(self.sequence_pointers[i]) + offset
        return self.tokens[p : p + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


class MockGPTDataset(GPTDataset):
    """GPTDataset over MockIndexedDataset (config.mock_num_documents documents, seeded by config.seed)."""

    def __init__(
        self,
        config: GPTDatasetConfig,
        num_samples: Optional[int],
        split_name: str = "train",
        sequence_ids: Optional[np.ndarray] = None,
        indexed: Optional[MockIndexedDataset] = None,
    ) -> None:
        if indexed is None:
            indexed = MockIndexedDataset.for_config(config)
        if sequence_ids is None:
            sequence_ids = np.arange(len(indexed), dtype=np.int32)
        super().__init__(indexed, None, sequence_ids, num_samples, split_name, config)


# ---------------------------------------------------------------------------------------------------
# Splits and blends (builder.build_splits, as for BERT; --split divides sequences)
# ---------------------------------------------------------------------------------------------------
def build_gpt_datasets(config: GPTDatasetConfig, num_samples: Sequence[Optional[int]]) -> tuple:
    """(train, valid, test) datasets with at least num_samples[i] samples each (None: one epoch).

    A split is None when its --split weight is 0 or it needs 0 samples. With a weighted blend each
    split is a BlendedDataset over one GPTDataset per prefix, each built with ceil(ceil(n * w) * 1.005)
    samples; with unweighted prefixes the parts are one epoch each and weighted by their sizes.
    """
    mock = MockIndexedDataset.for_config(config) if config.mock else None
    make = _make_mock if config.mock else GPTDataset
    return build_splits(config, num_samples, make, len, config.vocab_size,
                        f"shorter than one sample of {config.seq_length + 1} tokens", in_memory=mock)


def _make_mock(indexed, prefix, ids, num_samples, split_name, config) -> MockGPTDataset:
    """GPTDataset's constructor arguments, for MockGPTDataset (prefix is None)."""
    return MockGPTDataset(config, num_samples, split_name, ids, indexed)
