"""The protocol: file layout and tracker, atomic writes, weights_only loading."""

import os

import pytest
import torch

from megatron.checkpoint import protocol as ckpt
from megatron.core.errors import UserError


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
