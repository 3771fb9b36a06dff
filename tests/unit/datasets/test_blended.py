"""Blending: the greedy largest-error indices equal megatron-core's C++ ones, whole blends serve the same
samples as megatron-core's builder, each part builds ceil(ceil(n*w)*1.005) samples, and the cache."""

import json
import math

import numpy as np
import pytest

from megatron.core.datasets.blended import BlendedDataset, blending_indices, exhaustive_blending_indices
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset, build_gpt_datasets
from megatron.core.errors import UserError
from tests.megatron_core_oracle import run_oracle
from tests.unit.datasets.test_gpt_dataset import EOD, VOCAB, write_corpus

WEIGHTS = [[0.5, 0.5], [0.3, 0.7], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.999, 0.001]]
EXHAUSTIVE = [[3, 5], [10, 1, 7], [4]]
BLENDS = {
    "weighted": (["0.3", "a", "0.7", "b"], [200, 30, 7]),
    "three": (["2", "a", "1", "b", "1", "c"], [150, 12, 0]),
    "unweighted": (["a", "c"], [100, 10, 3]),
}

ORACLE_SCRIPT = r"""
import json, numpy
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

class Tok:
    unique_identifiers = {"class": "Tok"}
    vocab_size = 1000
    eod = 999

spec = json.load(open("spec.json"))
out = {}
for i, w in enumerate(spec["weights"]):
    which = numpy.zeros(1000, dtype=numpy.int16)
    sample = numpy.zeros(1000, dtype=numpy.int64)
    helpers.build_blending_indices(which, sample, numpy.array(w, dtype=numpy.float64), len(w), 1000, False)
    out[f"w{i}-which"], out[f"w{i}-sample"] = which, sample
for i, sizes in enumerate(spec["exhaustive"]):
    which = numpy.zeros(sum(sizes), dtype=numpy.int16)
    sample = numpy.zeros(sum(sizes), dtype=numpy.int64)
    helpers.build_exhaustive_blending_indices(which, sample, numpy.array(sizes, dtype=numpy.int64), len(sizes))
    out[f"e{i}-which"], out[f"e{i}-sample"] = which, sample
for name, (data_path, sizes) in spec["blends"].items():
    cfg = GPTDatasetConfig(random_seed=5, sequence_length=16, blend=get_blend_from_list(data_path), split="80,15,5",
        tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    for split, ds in zip(("train", "valid", "test"), BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()):
        if ds is None or len(ds) == 0:
            continue
        out[f"{name}-{split}-which"] = ds.dataset_index
        out[f"{name}-{split}-text"] = numpy.stack([numpy.concatenate([ds[k]["tokens"].numpy(), ds[k]["labels"].numpy()[-1:]]) for k in range(len(ds))])
        out[f"{name}-{split}-parts"] = numpy.array([len(d) for d in ds.datasets])
numpy.savez("oracle_out.npz", **out)
print("{}")
"""


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend_oracle")
    for name, n_docs, seed in (("a", 60, 0), ("b", 25, 1), ("c", 40, 2)):
        write_corpus(root / name, n_docs, seed)
    spec = {"weights": WEIGHTS, "exhaustive": EXHAUSTIVE, "blends": BLENDS}
    (root / "spec.json").write_text(json.dumps(spec))
    run_oracle(ORACLE_SCRIPT, cwd=root)  # relative prefixes: it runs in root
    theirs = dict(np.load(root / "oracle_out.npz"))
    ours = {}
    for name, (data_path, sizes) in BLENDS.items():
        cfg = GPTDatasetConfig(seq_length=16, seed=5, split="80,15,5", vocab_size=VOCAB, eod_token=EOD,
                               data_path=[p if p[0].isdigit() else str(root / p) for p in data_path],
                               data_cache_path=str(root / "cache"))
        ours[name] = build_gpt_datasets(cfg, sizes)
    return {"theirs": theirs, "ours": ours, "root": root}


def test_blending_indices_match_megatron_core_cpp(oracle):
    theirs = oracle["theirs"]
    for i, w in enumerate(WEIGHTS):
        ours = blending_indices(w, 1000)
        np.testing.assert_array_equal(ours["dataset_index"], theirs[f"w{i}-which"])
        np.testing.assert_array_equal(ours["dataset_sample_index"], theirs[f"w{i}-sample"])
    for i, sizes in enumerate(EXHAUSTIVE):
        ours = exhaustive_blending_indices(sizes)
        np.testing.assert_array_equal(ours["dataset_index"], theirs[f"e{i}-which"])
        np.testing.assert_array_equal(ours["dataset_sample_index"], theirs[f"e{i}-sample"])
        assert np.bincount(ours["dataset_index"]).tolist() == sizes


@pytest.mark.parametrize("name", list(BLENDS))
def test_blends_serve_the_same_samples_as_megatron_core(oracle, name):
    theirs = oracle["theirs"]
    for split, ds in zip(("train", "valid", "test"), oracle["ours"][name]):
        key = f"{name}-{split}"
        if ds is None:
            assert f"{key}-which" not in theirs
            continue
        assert isinstance(ds, BlendedDataset)
        np.testing.assert_array_equal(ds.dataset_index, theirs[f"{key}-which"])
        assert [len(d) for d in ds.datasets] == theirs[f"{key}-parts"].tolist()
        text = np.stack([np.concatenate([ds[k]["tokens"], ds[k]["labels"][-1:]]) for k in range(len(ds))])
        np.testing.assert_array_equal(text, theirs[f"{key}-text"])


def test_each_part_builds_its_share_plus_half_a_percent(oracle):
    train = oracle["ours"]["weighted"][0]
    n = 200
    assert [d.num_samples for d in train.datasets] == [math.ceil(math.ceil(n * w) * 1.005) for w in (0.3, 0.7)]
    assert len(train) == math.ceil(n * 0.3) + math.ceil(n * 0.7) >= n
    counts = np.bincount(np.asarray(train.dataset_index))
    assert abs(counts[0] - 0.3 * len(train)) <= 1 and abs(counts[1] - 0.7 * len(train)) <= 1


def test_blend_indices_are_cached(oracle):
    cache = oracle["root"] / "cache"
    assert len(list(cache.glob("*-BlendedDataset-train-dataset_index.npy"))) == 3
    data_path, sizes = BLENDS["weighted"]
    cfg = GPTDatasetConfig(seq_length=16, seed=5, split="80,15,5", vocab_size=VOCAB, eod_token=EOD,
                           data_path=[p if p[0].isdigit() else str(oracle["root"] / p) for p in data_path],
                           data_cache_path=str(cache))
    again = build_gpt_datasets(cfg, sizes)[0]
    assert isinstance(again.dataset_index, np.memmap)
    np.testing.assert_array_equal(again[17]["tokens"], oracle["ours"]["weighted"][0][17]["tokens"])


def test_blend_over_mock_parts_needs_no_files():
    cfg = GPTDatasetConfig(seq_length=8, mock=True, vocab_size=30, eod_token=29, mock_num_documents=50)
    parts = [MockGPTDataset(cfg, 40), MockGPTDataset(cfg, 40)]
    blend = BlendedDataset(parts, [1, 3], 40)
    assert len(blend) == 40 and np.bincount(blend.dataset_index).tolist() == [10, 30]
    np.testing.assert_array_equal(blend[1]["tokens"], parts[blend.dataset_index[1]][blend.dataset_sample_index[1]]["tokens"])


def test_blend_with_a_missing_prefix_is_a_user_error(oracle):
    cfg = GPTDatasetConfig(seq_length=16, vocab_size=VOCAB, eod_token=EOD,
                           data_path=["0.5", str(oracle["root"] / "a"), "0.5", str(oracle["root"] / "zzz")])
    with pytest.raises(UserError, match=r"zzz\.idx not found"):
        build_gpt_datasets(cfg, [10, 1, 1])


def test_unweighted_blend_with_a_too_short_part_is_a_user_error(oracle):
    """b's test split is one 5-token sequence: no sample of 17 tokens fits (megatron-core asserts)."""
    cfg = GPTDatasetConfig(seq_length=16, vocab_size=VOCAB, eod_token=EOD, split="80,15,5",
                           data_path=[str(oracle["root"] / "a"), str(oracle["root"] / "b")],
                           data_cache_path=str(oracle["root"] / "cache2"))
    with pytest.raises(UserError, match=r"test split of .*b is shorter than one sample"):
        build_gpt_datasets(cfg, [10, 1, 1])
