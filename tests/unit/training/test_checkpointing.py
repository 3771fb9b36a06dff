"""Checkpoint layout, atomic writes, weights_only loading and RNG round trips."""

import os
import random

import numpy as np
import pytest
import torch

from megatron.core.errors import UserError
from megatron.training import checkpointing as ckpt


def test_layout_and_tracker(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 100, {"model": {"w": torch.ones(2)}, "args": {"lr": 1.0}})
    assert path == str(tmp_path / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "100"
    loaded = ckpt.load_checkpoint(str(tmp_path))
    assert loaded["iteration"] == 100 and loaded["checkpoint_version"] == 3.0
    assert torch.equal(loaded["model"]["w"], torch.ones(2))
    # loadable by plain torch with weights_only=True (no pickled classes)
    torch.load(path, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000100", "latest_checkpointed_iteration.txt"]


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(str(tmp_path), 10, {"x": torch.zeros(1)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 20, {"x": torch.ones(1)})
    assert sorted(os.listdir(tmp_path)) == ["iter_0000010", "latest_checkpointed_iteration.txt"]
    assert ckpt.read_tracker(str(tmp_path)) == 10


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(str(tmp_path), 1, {"rng_state": ckpt.get_rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(str(tmp_path))["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_bad_checkpoints_give_user_errors(tmp_path):
    assert ckpt.load_checkpoint(str(tmp_path)) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(UserError, match="not an iteration"):
        ckpt.load_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(UserError, match="missing"):
        ckpt.load_checkpoint(str(tmp_path))
    f = tmp_path / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        ckpt.load_checkpoint(str(tmp_path))
