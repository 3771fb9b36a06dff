"""BertDataset: sample index and samples identical to megatron-core's, then the properties a BERT sample must
have (masking rate and 80/10/10, SOP balance and meaning, [CLS] A [SEP] B [SEP] layout, padding, whole
words), determinism, the on-disk cache and user errors."""

import json
import os

import numpy as np
import pytest
from pydoc_data.topics import topics
from tokenizers import BertWordPieceTokenizer as HFBertWordPiece

import megatron.core.datasets.bert_dataset as bert_module
from megatron.core.datasets.bert_dataset import (
    BertDatasetConfig,
    build_bert_datasets,
    build_sample_mapping,
)
from megatron.core.datasets.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.sentences import SentenceSplitter
from megatron.core.errors import UserError
from megatron.core.tokenizer.null import NullTokenizer
from megatron.core.tokenizer.wordpiece import BertWordPieceTokenizer
from tests.megatron_core_oracle import run_oracle

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Python's help topics as BERT data: a trained WordPiece vocab, one sequence per sentence."""
    root = tmp_path_factory.mktemp("bert")
    texts = [topics[k] for k in sorted(topics)]
    hf = HFBertWordPiece(lowercase=True)
    hf.train_from_iterator(texts, vocab_size=2000, special_tokens=SPECIALS, show_progress=False)
    hf.save_model(str(root))
    tok = BertWordPieceTokenizer(str(root / "vocab.txt"))
    splitter = SentenceSplitter()
    with IndexedDatasetBuilder(str(root / "topics.bin"), np.uint16) as b:
        for text in texts[:160]:
            sentences = [ids for ids in map(tok.tokenize, splitter.split(text)) if ids]
            b.add_document([i for s in sentences for i in s], [len(s) for s in sentences])
        b.finalize(str(root / "topics.idx"))
    return {"root": root, "tok": tok, "prefix": str(root / "topics"), "vocab": str(root / "vocab.txt")}


def config(data, **kw):
    kw.setdefault("seq_length", 64)
    kw.setdefault("seed", 11)
    kw.setdefault("split", "90,8,2")
    kw.setdefault("data_cache_path", str(data["root"] / "cache"))
    kw.setdefault("tokenizer", data["tok"])
    return BertDatasetConfig(data_path=[data["prefix"]], **kw)


def samples(ds, n=None):
    """{key: stacked array} over the first n samples."""
    out = [ds[k] for k in range(len(ds) if n is None else n)]
    return {key: np.stack([s[key] for s in out]) for key in out[0]}


# -- megatron-core as the oracle ---------------------------------------------------------------------
CASES = {  # name: (seq_length, binary_head, whole_word, max_ngram, short_seq_prob, samples)
    "megatron-default": (64, True, True, 3, 0.1, [300, 20, 5]),
    "no-head-no-wwm": (32, False, False, 1, 0.3, [200, 20, 5]),
    "no-short": (128, True, True, 3, 0.0, [60, 20, 5]),
}
COMPARED = 25  # samples compared per split (megatron-core's Python masking is slow); the index in full
MAPPING_CASES = {  # name: (max_seq_length, short_seq_prob, min_sentences, num_epochs, max_num_samples, seed)
    "short-0.1": (61, 0.1, 2, 1000, 500, 3),
    "no-short": (20, 0.0, 1, 1000, 300, 4),
    "always-short": (40, 1.0, 2, 1000, 200, 5),
    "one-epoch": (30, 0.25, 1, 1, 10**9, 6),
}

ORACLE_SCRIPT = r"""
import json, tempfile, numpy, torch
torch.distributed.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from megatron.core.datasets import helpers
from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

spec = json.load(open("spec.json"))
out = {}
m = numpy.load("mapping_inputs.npz")
for name, (max_len, short, min_sent, epochs, max_n, seed) in spec["mapping"].items():
    out["map-" + name] = helpers.build_mapping(m["docs"], m["sizes"], epochs, max_n, max_len, short, seed, False, min_sent)

class Tok:  # what the BERT dataset asks of a tokenizer: Megatron's _BertWordPieceTokenizer's ids
    unique_identifiers = {"class": "Tok"}
    def __init__(self, pieces):
        self.inv_vocab = dict(enumerate(pieces + ["[BOS]", "[EOS]"]))
        ids = {t: i for i, t in self.inv_vocab.items()}
        self.cls, self.sep, self.mask, self.pad, self.eod = (ids[t] for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[EOS]"))
        self.vocab_size = len(self.inv_vocab)

tok = Tok([line.strip() for line in open(spec["vocab"], encoding="utf-8")])
for name, (s, head, wwm, ngram, short, sizes) in spec["cases"].items():
    cfg = BERTMaskedWordPieceDatasetConfig(random_seed=11, sequence_length=s, blend=([spec["prefix"]], None),
        split="90,8,2", path_to_cache="oracle_cache_" + name, tokenizer=tok, masking_probability=0.15,
        short_sequence_probability=short, masking_max_ngram=ngram, masking_do_full_word=wwm,
        masking_do_permutation=False, masking_use_longer_ngrams=False, masking_use_geometric_distribution=False,
        classification_head=head)
    for split, ds in zip(("train", "valid", "test"), BlendedMegatronDatasetBuilder(BERTMaskedWordPieceDataset, sizes, lambda: True, cfg).build()):
        key = f"{name}-{split}"
        out[key + "-sample_index"] = numpy.asarray(ds.sample_index)
        for field in ("text", "types", "labels", "loss_mask", "padding_mask", "is_random"):
            out[f"{key}-{field}"] = numpy.stack([numpy.asarray(ds[k][field]) for k in range(min(len(ds), spec["compared"]))])
numpy.savez("oracle_out.npz", **out)
print("{}")
"""


def mapping_inputs(seed=0):
    """Documents of 0..7 sentences of 1..60 tokens, with long sentences in multi- and one-sentence docs."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 8, 300)
    sizes = rng.integers(1, 60, int(counts.sum())).astype(np.int32)
    docs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    multi, single = np.flatnonzero(counts >= 2)[:3], np.flatnonzero(counts == 1)[:2]
    sizes[docs[multi]] = 513  # these documents are skipped
    sizes[docs[single]] = 600  # these are not (one sentence: not checked)
    return docs, sizes


@pytest.fixture(scope="module")
def oracle(data):
    root = data["root"]
    docs, sizes = mapping_inputs()
    np.savez(root / "mapping_inputs.npz", docs=docs, sizes=sizes)
    spec = {"prefix": data["prefix"], "vocab": data["vocab"], "cases": CASES, "mapping": MAPPING_CASES,
            "compared": COMPARED}
    (root / "spec.json").write_text(json.dumps(spec))
    run_oracle(ORACLE_SCRIPT, cwd=root)
    return dict(np.load(root / "oracle_out.npz"))


@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize("name", list(MAPPING_CASES))
def test_sample_mapping_matches_megatron_core_cpp(oracle, name, blocks, monkeypatch):
    if blocks == "tiny":  # many sentence blocks, target and shuffle draws across block ends: same rows
        monkeypatch.setattr(bert_module, "_BLOCK_SENTENCES", 7)
        monkeypatch.setattr(bert_module, "_TARGET_BLOCK", 3)
        monkeypatch.setattr(bert_module, "_SHUFFLE_BLOCK", 5)
    docs, sizes = mapping_inputs()
    max_len, short, min_sent, epochs, max_n, seed = MAPPING_CASES[name]
    ours = build_sample_mapping(docs, sizes, epochs, max_n, max_len, short, seed, min_sent)
    ref = oracle["map-" + name]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_samples_match_megatron_core(data, oracle, name):
    s, head, wwm, ngram, short, sizes = CASES[name]
    cfg = config(data, seq_length=s, binary_head=head, whole_word_masking=wwm, max_ngram=ngram, short_seq_prob=short)
    for split, ds in zip(("train", "valid", "test"), build_bert_datasets(cfg, sizes)):
        key = f"{name}-{split}"
        np.testing.assert_array_equal(np.asarray(ds.sample_index), oracle[key + "-sample_index"])
        ours = samples(ds, min(len(ds), COMPARED))
        for field in ("text", "types", "labels", "is_random"):
            np.testing.assert_array_equal(ours[field], oracle[f"{key}-{field}"], err_msg=f"{key} {field}")
        np.testing.assert_array_equal(ours["loss_mask"], oracle[key + "-loss_mask"].astype(np.float32))
        np.testing.assert_array_equal(ours["padding_mask"], oracle[key + "-padding_mask"] == 0)  # ours: True = pad


# -- properties of the samples -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def many(data):
    """2000 training samples with Megatron's defaults, and the dataset."""
    (ds, _, _) = build_bert_datasets(config(data, seq_length=128), [2000, 0, 0])
    return ds, samples(ds, 2000)


def originals(batch):
    """The token ids before masking: labels where masked, text elsewhere."""
    return np.where(batch["labels"] >= 0, batch["labels"], batch["text"])


def test_output_contract(many):
    ds, _ = many
    x = ds[0]
    assert set(x) == {"text", "types", "labels", "loss_mask", "padding_mask", "is_random"}
    for key, dtype in (("text", np.int64), ("types", np.int64), ("labels", np.int64), ("loss_mask", np.float32),
                       ("padding_mask", np.bool_)):
        assert x[key].dtype == dtype and x[key].shape == (128,), key
    assert x["is_random"].dtype == np.int64 and x["is_random"].shape == ()


def test_mask_rate_and_80_10_10(data, many):
    _, b = many
    tok = data["tok"]
    loss = b["loss_mask"].astype(bool)
    assert np.array_equal(loss, b["labels"] >= 0)
    n_tokens = (~b["padding_mask"]).sum(axis=1)  # [CLS] and [SEP] count, as in Megatron
    n_masked = loss.sum(axis=1)
    assert np.all(n_masked <= np.maximum(1, np.round(0.15 * n_tokens)))  # never more than the budget
    rate = n_masked.sum() / n_tokens.sum()
    assert 0.13 < rate <= 0.15, rate  # whole-word n-grams that do not fit leave the budget a little short
    chosen = b["text"][loss]
    as_mask = np.mean(chosen == tok.mask)
    kept = np.mean(chosen == b["labels"][loss])
    replaced = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(replaced - 0.1) < 0.02, (as_mask, kept)


def test_sentence_order_prediction(data, many):
    ds, b = many
    tok = data["tok"]
    assert abs(b["is_random"].mean() - 0.5) < 0.04, b["is_random"].mean()
    orig = originals(b)
    whole = 0
    for k in range(len(b["text"])):
        beg, end, target = (int(v) for v in ds.sample_index[k])
        sentences = np.concatenate([ds.indexed.get(i) for i in range(beg, end)]).astype(np.int64)
        n = int((~b["padding_mask"][k]).sum())
        assert n <= target + 3
        seps = np.flatnonzero(orig[k, :n] == tok.sep)
        first, second = orig[k, 1 : seps[0]], orig[k, seps[0] + 1 : n - 1]
        # The text's own order is A then B; a swapped sample (is_random) shows B first.
        a, b_ = (second, first) if b["is_random"][k] else (first, second)
        if len(sentences) <= target:  # nothing trimmed: A B is exactly the sample's sentences
            np.testing.assert_array_equal(np.concatenate([a, b_]), sentences)
            whole += 1
        else:  # trimmed at random ends: A and B are still runs of the text, A before B
            assert starts(sentences, a).min() + len(a) <= starts(sentences, b_).max(), k
    assert whole > 100


def starts(hay, needle):
    """Positions where `needle` occurs in `hay`."""
    windows = np.lib.stride_tricks.sliding_window_view(hay, len(needle))
    found = np.flatnonzero(np.all(windows == needle, axis=1))
    assert len(found), "segment is not a run of the sample's sentences"
    return found


def test_segment_layout_and_padding(data, many):
    _, b = many
    tok = data["tok"]
    orig = originals(b)
    for k in range(len(b["text"])):
        n = int((~b["padding_mask"][k]).sum())
        assert np.array_equal(b["padding_mask"][k], np.arange(128) >= n)  # padding is one tail
        seps = np.flatnonzero(orig[k, :n] == tok.sep)
        assert orig[k, 0] == tok.cls and len(seps) == 2 and seps[1] == n - 1 and 1 < seps[0] < n - 2
        assert tok.cls not in orig[k, 1:n] and tok.pad not in orig[k, :n]
        expected_types = np.zeros(128, np.int64)
        expected_types[seps[0] + 1 : n] = 1  # 0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding
        assert np.array_equal(b["types"][k], expected_types)
        assert np.all(b["text"][k, n:] == tok.pad) and np.all(b["labels"][k, n:] == -1)
        assert not b["loss_mask"][k, [0, *seps]].any()  # [CLS] and [SEP] are never masked
    lengths = (~b["padding_mask"]).sum(axis=1)
    assert np.mean(lengths < 64) > 0.03  # --short-seq-prob 0.1 makes some samples short


def word_breaks(orig, mask, tok):
    """Positions p where a `##` piece is masked differently from the piece before it (same segment)."""
    cont = np.array([tok.inv_vocab[int(i)].startswith("##") for i in orig])
    special = np.isin(orig, [tok.cls, tok.sep, tok.pad])
    p = np.flatnonzero(cont[1:] & ~special[:-1]) + 1
    return p[mask[p] != mask[p - 1]]


def test_whole_word_masking_masks_whole_words(data, many):
    _, b = many
    tok, orig = data["tok"], originals(b)
    assert sum(len(word_breaks(orig[k], b["loss_mask"][k], tok)) for k in range(len(orig))) == 0
    (ds, _, _) = build_bert_datasets(config(data, seq_length=128, whole_word_masking=False), [300, 0, 0])
    piecewise = samples(ds)
    orig = originals(piecewise)
    assert sum(len(word_breaks(orig[k], piecewise["loss_mask"][k], tok)) for k in range(len(orig))) > 50


def test_ngram_masking_makes_longer_spans(data):
    def mean_span(max_ngram):
        (ds, _, _) = build_bert_datasets(config(data, seq_length=128, max_ngram=max_ngram, whole_word_masking=False),
                                         [400, 0, 0])
        mask = samples(ds)["loss_mask"].astype(np.int8)
        starts = np.sum(np.diff(mask, axis=1, prepend=0) == 1)
        return mask.sum() / starts

    one, three = mean_span(1), mean_span(3)
    assert one < 1.2 and three > one + 0.3, (one, three)


def test_no_binary_head(data):
    (ds, _, _) = build_bert_datasets(config(data, binary_head=False), [300, 0, 0])
    b = samples(ds)
    assert not b["is_random"].any() and not b["types"].any()  # one segment, never swapped
    index = np.asarray(ds.sample_index)
    assert np.any(index[:, 1] - index[:, 0] == 1)  # one-sentence samples are allowed
    orig = originals(b)
    assert all(np.sum(orig[k] == data["tok"].sep) == 1 for k in range(len(orig)))  # [CLS] A [SEP]


def test_deterministic_per_sample_and_seed(data):
    train, _, _ = build_bert_datasets(config(data, seed=5), [100, 0, 0])
    again, _, _ = build_bert_datasets(config(data, seed=5, data_cache_path=str(data["root"] / "other")), [100, 0, 0])
    other, _, _ = build_bert_datasets(config(data, seed=6), [100, 0, 0])
    for k in (0, 7, 99):
        for key, value in train[k].items():
            np.testing.assert_array_equal(value, train[k][key])  # same index, same sample
            np.testing.assert_array_equal(value, again[k][key])  # rebuilt from scratch: the same
    np.testing.assert_array_equal(samples(train, 50)["text"], samples(again, 50)["text"])
    assert not np.array_equal(samples(train, 50)["text"], samples(other, 50)["text"])
    assert not np.array_equal(np.asarray(train.sample_index), np.asarray(other.sample_index))


def test_index_is_cached_and_reused(data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, _, _ = build_bert_datasets(config(data, data_cache_path=str(cache)), [80, 0, 0])
    names = sorted(p.name for p in cache.iterdir() if "BertDataset" in p.name)
    assert len(names) == 2 and names[0].endswith("-BertDataset-train-description.txt")
    assert names[1].endswith("-BertDataset-train-sample_index.npy")
    assert len(list(cache.glob("*-token_range.json"))) == 1  # the start-up token-id check, cached beside
    assert json.loads((cache / names[0]).read_text())["num_samples"] == 80

    def no_build(*args, **kwargs):
        raise AssertionError("the cached index should have been loaded")

    monkeypatch.setattr(bert_module, "build_sample_mapping", no_build)
    again, _, _ = build_bert_datasets(config(data, data_cache_path=str(cache)), [80, 0, 0])
    assert isinstance(again.sample_index, np.memmap)
    np.testing.assert_array_equal(again.sample_index, first.sample_index)
    monkeypatch.undo()
    build_bert_datasets(config(data, data_cache_path=str(cache), short_seq_prob=0.2), [80, 0, 0])
    assert len(list(cache.glob("*BertDataset*"))) == 4  # another setting: new entries beside the old


def test_default_cache_is_next_to_the_data(data):
    cfg = BertDatasetConfig(seq_length=64, data_path=[data["prefix"]], tokenizer=data["tok"])
    assert cfg.cache_dir == str(data["root"] / "cache" / "BertDataset_indices")


def test_splits_are_document_ranges_and_blends_work(data):
    n_docs = IndexedDataset(data["prefix"]).num_documents
    train, valid, test = build_bert_datasets(config(data), [50, 10, 5])
    for ds, (lo, hi) in ((train, (0, 0.9)), (valid, (0.9, 0.98)), (test, (0.98, 1.0))):
        docs = ds.indexed.document_indices
        first, last = int(round(lo * n_docs)), int(round(hi * n_docs))
        assert docs[first] <= ds.sample_index[:, 0].min() and ds.sample_index[:, 1].max() <= docs[last]
    blend, _, _ = build_bert_datasets(
        BertDatasetConfig(seq_length=64, seed=11, split="90,8,2", tokenizer=data["tok"],
                          data_path=["0.3", data["prefix"], "0.7", data["prefix"]],
                          data_cache_path=str(data["root"] / "cache")), [40, 0, 0])
    assert len(blend) == 40 and set(np.unique(blend.dataset_index)) == {0, 1}
    assert blend[3]["text"].shape == (64,)


def test_user_errors(data, tmp_path):
    with pytest.raises(UserError, match=r"tokenizer NullTokenizer has no \[CLS\] token; BERT needs a WordPiece"):
        config(data, tokenizer=NullTokenizer(10))
    with pytest.raises(UserError, match="--seq-length must be an integer >= 5"):
        config(data, seq_length=4)
    with pytest.raises(UserError, match="--mask-prob must be in"):
        config(data, masked_lm_prob=0.0)
    with IndexedDatasetBuilder(str(tmp_path / "docs.bin"), np.uint16) as b:  # document-level data
        for _ in range(20):
            b.add_document(list(range(5, 25)), [20])
        b.finalize(str(tmp_path / "docs.idx"))
    cfg = BertDatasetConfig(seq_length=64, data_path=[str(tmp_path / "docs")], tokenizer=data["tok"], split="1,0,0")
    with pytest.raises(UserError, match="has no document that makes a sample.*--split-sentences"):
        build_bert_datasets(cfg, [10, 0, 0])
    cfg = BertDatasetConfig(seq_length=64, data_path=[data["prefix"]], tokenizer=data["tok"], split="1000,0,1",
                            data_cache_path=str(tmp_path / "c"))
    with pytest.raises(UserError, match="the test split of .* has no documents"):
        build_bert_datasets(cfg, [10, 0, 5])
    small = tmp_path / "small.txt"  # a 100-piece vocab: the data's ids (up to 2000) do not fit
    small.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(95)]) + "\n", encoding="utf-8")
    cfg = BertDatasetConfig(seq_length=64, data_path=[data["prefix"]], split="1,0,0",
                            data_cache_path=str(tmp_path / "small-cache"), tokenizer=BertWordPieceTokenizer(str(small)))
    with pytest.raises(UserError, match="token id .* is outside this tokenizer's vocab of 102"):
        build_bert_datasets(cfg, [5, 0, 0])  # at start-up, before any index is built
    assert not (tmp_path / "small-cache").exists()


# -- several ranks: rank 0 builds, the others memory-map its cache ---------------------------------------
def _ranks_build(rank, world_size, data, out_dir, bad):
    if rank != 0:  # only rank 0 may build; the others must find its files
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} built a sample index")

        bert_module.build_sample_mapping = refuse
    # bad: a train split without documents; rank 0's error must reach every rank, none may hang
    cfg = config(data, data_cache_path=os.path.join(out_dir, "cache"), split="1,100000,0" if bad else "90,8,2")
    try:
        train, _, _ = build_bert_datasets(cfg, [50, 0, 0])
    except UserError as e:
        result = {"error": str(e)}
    else:
        result = {"memmap": isinstance(train.sample_index, np.memmap), "index": np.asarray(train.sample_index).tolist()}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("bad", [False, True])
def test_rank_0_builds_the_index_and_the_others_map_it(data, tmp_path, bad):
    from tests.distributed.launcher import run_distributed

    run_distributed(_ranks_build, world_size=3, args=(data, str(tmp_path), bad), hang_after_s=120)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    if bad:
        assert all(g == got[0] for g in got) and "the train split of" in got[0]["error"], got
        return
    alone, _, _ = build_bert_datasets(config(data, data_cache_path=str(tmp_path / "alone")), [50, 0, 0])
    for rank, g in enumerate(got):
        assert g["index"] == np.asarray(alone.sample_index).tolist(), rank  # as one process builds it
        assert g["memmap"] == (rank != 0), rank  # rank 0 keeps what it built, the others map its file
