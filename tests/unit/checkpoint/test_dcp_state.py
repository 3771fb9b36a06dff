"""Pieces of global tensors (dcp_state.py) against the tensor-parallel split itself (sharding.py), and a
DCP round trip that reshards: written as TP=2 pieces, read back as TP=4 and TP=1."""

import pytest
import torch

from megatron.checkpoint.dcp_io import Chunks, read_dcp, read_metadata, write_dcp
from megatron.checkpoint.dcp_state import blocks_of, saved_shapes, targets_for
from megatron.core.tensor_parallel.sharding import shard_tensor


def _tagged(t, spec):
    """A parameter with the partition tags the tensor-parallel layers put on theirs."""
    p = torch.nn.Parameter(t.clone())
    if spec is not None:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, spec[0], spec[1]
    return p


@pytest.mark.parametrize("spec", [None, (0, 1), (1, 1), (0, 2)], ids=["replicated", "rows", "columns", "swiglu"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_blocks_sit_where_the_shard_sits(spec, tp):
    full = torch.arange(16 * 8, dtype=torch.float32).view(16, 8)
    for rank in range(tp):
        shard = full if spec is None else shard_tensor(full, spec[0], spec[1], rank, tp)
        shape, blocks = blocks_of(shard, spec, rank, tp)
        assert tuple(shape) == tuple(full.shape)
        covered = sum(view.numel() for view, _ in blocks)
        assert covered == shard.numel()
        for view, offsets in blocks:
            region = full[offsets[0]:offsets[0] + view.shape[0], offsets[1]:offsets[1] + view.shape[1]]
            assert torch.equal(region, view)


def _pieces(full, spec, tp):
    """Every TP rank's pieces of `full` in one Chunks (one process writes them all)."""
    blocks = []
    for rank in range(tp):
        shard = shard_tensor(full, spec[0], spec[1], rank, tp)
        blocks += blocks_of(shard, spec, rank, tp)[1]
    return Chunks(full.shape, blocks)


def test_round_trip_reshards_tp2_to_tp4_and_pads_the_vocabulary(tmp_path):
    torch.manual_seed(0)
    fc1 = torch.randn(16, 8)  # SwiGLU [gate; up], stride 2
    emb = torch.randn(12, 8)  # a padded vocabulary of 12 rows at TP=2
    write_dcp({"fc1": _pieces(fc1, (0, 2), 2), "emb": _pieces(emb, (0, 1), 2)}, str(tmp_path), no_dist=True)
    md = read_metadata(str(tmp_path))
    saved = saved_shapes(md)
    assert saved == {"fc1": torch.Size([16, 8]), "emb": torch.Size([12, 8])}
    for rank in range(4):
        like_fc1 = _tagged(shard_tensor(fc1, 0, 2, rank, 4), (0, 2))
        like_emb = _tagged(torch.empty(4, 8), (0, 1))  # TP=4 pads the same vocabulary to 16 rows
        got_fc1, got_emb = torch.full_like(like_fc1, -1.0), torch.full((4, 8), -1.0)
        state = {"fc1": targets_for(got_fc1, like_fc1, "fc1", rank, 4, saved["fc1"]),
                 "embedding.word_embeddings.weight": targets_for(got_emb, like_emb, "embedding.word_embeddings.weight",
                                                                 rank, 4, saved["emb"])}
        state["emb"] = state.pop("embedding.word_embeddings.weight")
        read_dcp(state, str(tmp_path), md, no_dist=True)
        assert torch.equal(got_fc1, shard_tensor(fc1, 0, 2, rank, 4))
        padded = torch.cat([emb, torch.zeros(4, 8)])  # rows past the saved 12 are zero padding
        assert torch.equal(got_emb, padded[rank * 4:(rank + 1) * 4])
    whole = torch.empty(16, 8)
    read_dcp({"fc1": whole}, str(tmp_path), md, no_dist=True)  # one process reads the unsharded tensor
    assert torch.equal(whole, fc1)
