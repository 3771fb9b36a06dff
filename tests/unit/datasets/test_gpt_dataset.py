"""GPTDataset: index arrays and samples identical to megatron-core's, samples equal to an independent walk
of the token stream, the on-disk cache, masks/positions, splits, and user errors."""

import json

import numpy as np
import pytest

from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
    build_gpt_datasets,
    build_indices,
    build_sample_index,
    masks_and_positions,
)
from megatron.core.datasets.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron.core.errors import UserError
from tests.megatron_core_oracle import run_oracle

VOCAB, EOD = 1000, 999


def write_corpus(prefix, n_docs, seed, max_len=40, dtype=np.uint16):
    """Random documents of 0..max_len tokens (some empty), each non-empty one ending in EOD."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as b:
        for _ in range(n_docs):
            n = int(rng.integers(0, max_len + 1))
            ids = rng.integers(0, EOD, n)
            if n:
                ids[-1] = EOD
            b.add_document(ids, [n] if n else [])
        b.finalize(f"{prefix}.idx")
    return str(prefix)


def config(data_path, **kw):
    kw.setdefault("seq_length", 16)
    kw.setdefault("seed", 7)
    kw.setdefault("split", "90,8,2")
    return GPTDatasetConfig(data_path=data_path, vocab_size=VOCAB, eod_token=EOD, **kw)


def stream_samples(ds):
    """Independent truth: concatenate the documents in document_index order and cut s+1 tokens every s."""
    s = ds.config.seq_length
    stream = np.concatenate([ds.indexed.get(int(d)) for d in ds.document_index]).astype(np.int64)
    return [stream[j * s : j * s + s + 1] for j in range(len(ds))]


# -- megatron-core as the oracle ---------------------------------------------------------------------
SIZES = {"short": [130, 20, 6], "long": [560, 40, 3], "seed2": [301, 20, 6]}  # `short` separates the last epoch

ORACLE_SCRIPT = r"""
import json, numpy
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

class Tok:  # what GPTDataset asks of a tokenizer
    unique_identifiers = {"class": "Tok"}
    vocab_size = 1000
    eod = 999

out = {}
cases = numpy.load("walk_cases.npz")
for i in range(int(cases["n"])):
    sizes, doc, s = cases[f"sizes{i}"], cases[f"doc{i}"], int(cases[f"s{i}"])
    epochs, tpe = int(cases[f"epochs{i}"]), int(cases[f"tpe{i}"])
    out[f"walk{i}"] = helpers.build_sample_idx(sizes, doc, s, epochs, tpe, True, True)

spec = json.load(open("spec.json"))
for name, sizes in spec["sizes"].items():
    cfg = GPTDatasetConfig(random_seed=spec["seeds"][name], sequence_length=16, blend=(["corpus"], None),
        split="90,8,2", tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache="oracle_cache")
    for split, ds in zip(("train", "valid", "test"), BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()):
        key = f"{name}-{split}"
        out[key + "-document_index"] = ds.document_index
        out[key + "-sample_index"] = ds.sample_index
        out[key + "-shuffle_index"] = ds.shuffle_index
        out[key + "-text"] = numpy.stack([numpy.concatenate([ds[k]["tokens"].numpy(), ds[k]["labels"].numpy()[-1:]]) for k in range(len(ds))])
numpy.savez("oracle_out.npz", **out)
print("{}")
"""


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Build everything once: megatron-core's arrays/samples and ours, for the same corpus."""
    root = tmp_path_factory.mktemp("gpt_oracle")
    prefix = write_corpus(root / "corpus", 80, seed=0)
    rng = np.random.default_rng(1)
    walk = {"n": 4}
    for i in range(4):  # random lengths with empty documents; case 0 starts with an empty document
        lengths = rng.integers(0, 30, 50).astype(np.int32)
        lengths[0] = 0
        epochs = i + 1
        doc = np.tile(np.arange(50, dtype=np.int32), epochs)
        if i:
            rng.shuffle(doc)
        walk.update({f"sizes{i}": lengths, f"doc{i}": doc, f"s{i}": [5, 16, 1 + i, 64][i],
                     f"epochs{i}": epochs, f"tpe{i}": int(lengths.sum())})
    np.savez(root / "walk_cases.npz", **walk)
    seeds = {"short": 7, "long": 7, "seed2": 1234}
    (root / "spec.json").write_text(json.dumps({"sizes": SIZES, "seeds": seeds}))
    run_oracle(ORACLE_SCRIPT, cwd=root)
    theirs = dict(np.load(root / "oracle_out.npz"))
    ours = {name: build_gpt_datasets(config([prefix], seed=seeds[name], data_cache_path=str(root / "ours")), SIZES[name])
            for name in SIZES}
    return {"walk": walk, "theirs": theirs, "ours": ours}


def test_sample_index_matches_megatron_core_cpp(oracle):
    walk, theirs = oracle["walk"], oracle["theirs"]
    for i in range(walk["n"]):
        ours = build_sample_index(walk[f"sizes{i}"], walk[f"doc{i}"], walk[f"s{i}"], walk[f"epochs{i}"] * walk[f"tpe{i}"])
        assert ours.dtype == theirs[f"walk{i}"].dtype
        np.testing.assert_array_equal(ours, theirs[f"walk{i}"])


@pytest.mark.parametrize("name", list(SIZES))
def test_indices_and_samples_match_megatron_core(oracle, name):
    theirs = oracle["theirs"]
    for split, ds in zip(("train", "valid", "test"), oracle["ours"][name]):
        key = f"{name}-{split}"
        for array in ("document_index", "sample_index", "shuffle_index"):
            mine, ref = np.asarray(getattr(ds, array)), theirs[f"{key}-{array}"]
            assert mine.dtype == ref.dtype, (key, array)
            np.testing.assert_array_equal(mine, ref, err_msg=f"{key} {array}")
        text = np.stack([np.concatenate([ds[k]["tokens"], ds[k]["labels"][-1:]]) for k in range(len(ds))])
        np.testing.assert_array_equal(text, theirs[f"{key}-text"])


def test_both_final_epoch_rules_are_exercised(oracle):
    """The megatron-core comparison above covers both rules: `short` needs a sliver of a last epoch
    (shuffled apart), `long` needs most of it (shuffled with the others)."""

    def separate(ds, s=16):
        tpe, n = ds.description["tokens_per_epoch"], ds.num_samples
        epochs = -(-(n * s + 1) // tpe)
        from_last = n - ((epochs - 1) * tpe - 1) // s
        return epochs > 1 and from_last < int(0.8 * ((tpe - 1) // s))

    assert separate(oracle["ours"]["short"][0]) and not separate(oracle["ours"]["long"][0])
    assert len(oracle["ours"]["long"][0].document_index) > 2 * 70  # several epochs


def test_samples_equal_an_independent_walk_of_the_token_stream(oracle):
    for datasets in oracle["ours"].values():
        for ds in datasets:
            truth = stream_samples(ds)
            for k in range(len(ds)):
                np.testing.assert_array_equal(ds.read(k), truth[int(ds.shuffle_index[k])])


# -- samples -------------------------------------------------------------------------------------------
def test_sample_fields(tmp_path):
    prefix = write_corpus(tmp_path / "c", 40, seed=3)
    train, _, _ = build_gpt_datasets(config([prefix], eod_mask_loss=True, reset_position_ids=True), [20, 0, 0])
    sample = train[5]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].dtype == np.int64 and sample["labels"].dtype == np.int64
    assert sample["loss_mask"].dtype == np.float32 and sample["position_ids"].dtype == np.int64
    assert all(v.shape == (16,) for v in sample.values())
    x = train.read(5)
    np.testing.assert_array_equal(sample["tokens"], x[:-1])
    np.testing.assert_array_equal(sample["labels"], x[1:])


def megatron_positions(tokens, eod):
    """Megatron's loop, written out: after an EOD at i, positions from i+1 on restart at 0."""
    pos = list(range(len(tokens)))
    prev = 0
    for i in [i for i, t in enumerate(tokens) if t == eod]:
        for j in range(i + 1, len(tokens)):
            pos[j] -= i + 1 - prev
        prev = i + 1
    return pos


@pytest.mark.parametrize("tokens", [[5, 9, 1, 2, 9, 9, 3, 4], [9, 1, 2, 3], [1, 2, 3, 9], [1, 2, 3, 4]])
def test_masks_and_positions(tokens):
    t = np.array(tokens)
    mask, pos = masks_and_positions(t, 9, reset_position_ids=True, eod_mask_loss=True)
    assert pos.tolist() == megatron_positions(tokens, 9)
    assert mask.tolist() == [0.0 if x == 9 else 1.0 for x in tokens]
    mask, pos = masks_and_positions(t, 9, reset_position_ids=False, eod_mask_loss=False)
    assert pos.tolist() == list(range(len(tokens))) and mask.tolist() == [1.0] * len(tokens)


# -- cache ---------------------------------------------------------------------------------------------
def test_cache_written_next_to_data_and_reloaded_with_mmap(tmp_path):
    prefix = write_corpus(tmp_path / "c", 50, seed=4)
    cfg = config([prefix])
    first = build_gpt_datasets(cfg, [100, 10, 2])
    cache = tmp_path / "cache" / "GPTDataset_indices"
    names = sorted(p.name for p in cache.iterdir() if "-GPTDataset-" in p.name)  # not the token-range scan
    assert len(names) == 12 and not any(n.endswith(".tmp") for n in names)  # 3 splits x 4 files
    for split in ("train", "valid", "test"):
        stems = {n.split("-GPTDataset-")[0] for n in names if f"-GPTDataset-{split}-" in n}
        assert len(stems) == 1 and len(stems.pop()) == 32  # one md5 per split
    assert {n.split("-", 3)[3] for n in names} == {
        "description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"}
    desc = json.loads(next(cache.glob("*-GPTDataset-train-description.txt")).read_text())
    assert desc["dataset_path"] == prefix and desc["random_seed"] == 7 and desc["sequence_length"] == 16

    again = build_gpt_datasets(cfg, [100, 10, 2])
    assert isinstance(again[0].shuffle_index, np.memmap)
    for a, b in zip(first, again):
        for k in range(len(a)):
            np.testing.assert_array_equal(a[k]["tokens"], b[k]["tokens"])
    build_gpt_datasets(config([prefix], seed=8), [100, 10, 2])  # another seed: new entries
    assert len([p for p in cache.iterdir() if "-GPTDataset-" in p.name]) == 24


def test_data_cache_path_and_tokenizer_in_key(tmp_path):
    prefix = write_corpus(tmp_path / "c", 50, seed=4)
    build_gpt_datasets(config([prefix], data_cache_path=str(tmp_path / "mine"), tokenizer_description="a"), [50, 0, 0])
    build_gpt_datasets(config([prefix], data_cache_path=str(tmp_path / "mine"), tokenizer_description="b"), [50, 0, 0])
    assert len(list((tmp_path / "mine").glob("*-GPTDataset-train-description.txt"))) == 2
    assert not (tmp_path / "cache").exists()


# -- splits --------------------------------------------------------------------------------------------
def test_splits_are_contiguous_and_none_when_off_or_unneeded(tmp_path):
    """GPT splits count sequences (not documents): train = ids [0, round(0.8 n)), valid the rest."""
    prefix = write_corpus(tmp_path / "c", 100, seed=5)
    n = len(IndexedDataset(prefix))
    cut = int(round(0.8 * n))
    train, valid, test = build_gpt_datasets(config([prefix], split="80,20,0"), [30, 0, 5])
    assert valid is None and test is None
    assert set(np.unique(train.document_index).tolist()) == set(range(cut))
    _, valid, _ = build_gpt_datasets(config([prefix], split="80,20,0"), [30, 5, 0])
    assert set(np.unique(valid.document_index).tolist()) == set(range(cut, n))
    assert len(train) >= 30 and len(valid) >= 5


# -- user errors ---------------------------------------------------------------------------------------
def test_token_id_outside_vocab_names_the_prefix(tmp_path):
    prefix = write_corpus(tmp_path / "c", 30, seed=6)
    # this run's tokenizer is smaller than the one that wrote the data
    cfg = GPTDatasetConfig(seq_length=16, data_path=[prefix], vocab_size=500, eod_token=0)
    with pytest.raises(UserError, match=f"{prefix}.*another tokenizer") as e:
        build_gpt_datasets(cfg, [10, 0, 0])  # found at start-up by the token-range scan
    assert "\n" not in str(e.value)


def test_missing_prefix_and_empty_split(tmp_path):
    with pytest.raises(UserError, match=r"nope\.idx not found"):
        build_gpt_datasets(config([str(tmp_path / "nope")]), [10, 1, 1])
    prefix = write_corpus(tmp_path / "c", 10, seed=6)
    with pytest.raises(UserError, match="valid split"):
        build_gpt_datasets(config([prefix], split="99,1,0"), [10, 3, 0])


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(data_path=None), "--data-path"),
        (dict(data_path=["a"], mock=True), "exclude"),
        (dict(data_path=["a"], seq_length=0), "--seq-length"),
        (dict(data_path=["a"], split="x"), "--split"),
        (dict(data_path=["a"], eod_token=VOCAB), "EOD"),
    ],
)
def test_config_validation(kw, pattern):
    kw = {"seq_length": 8, "vocab_size": VOCAB, **kw}
    with pytest.raises(UserError, match=pattern):
        GPTDatasetConfig(**kw)


# -- mock data -----------------------------------------------------------------------------------------
def test_mock_dataset_is_deterministic_and_ends_documents_in_eod():
    cfg = GPTDatasetConfig(seq_length=32, mock=True, vocab_size=50, eod_token=49, seed=3, mock_num_documents=200)
    a, b = MockGPTDataset(cfg, 100), MockGPTDataset(cfg, 100)
    for k in range(0, 100, 7):
        np.testing.assert_array_equal(a[k]["tokens"], b[k]["tokens"])
        assert a[k]["tokens"].max() < 50
    low = a.indexed
    assert all(low.get(i)[-1] == 49 and (low.get(i)[:-1] != 49).all() for i in range(len(low)))
    train, valid, test = build_gpt_datasets(cfg, [50, 10, 5])
    assert len(train) >= 50 and len(valid) >= 10 and len(test) >= 5
    c = MockGPTDataset(GPTDatasetConfig(seq_length=32, mock=True, vocab_size=50, eod_token=49, seed=4), 100)
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_build_indices_is_pure():
    lengths = np.array([5, 0, 7, 3, 9], dtype=np.int32)
    ids = np.arange(5, dtype=np.int32)
    a, b = build_indices(lengths, ids, 10, 4, 11), build_indices(lengths, ids, 10, 4, 11)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["shuffle_index"].dtype == np.uint32 and a["document_index"].dtype == np.int32


def test_dataset_pickles(tmp_path):
    import pickle

    prefix = write_corpus(tmp_path / "c", 20, seed=2)
    train, _, _ = build_gpt_datasets(config([prefix]), [10, 0, 0])
    clone = pickle.loads(pickle.dumps(train))
    np.testing.assert_array_equal(clone[3]["tokens"], train[3]["tokens"])
    assert isinstance(clone.indexed, IndexedDataset) and isinstance(train, GPTDataset)
