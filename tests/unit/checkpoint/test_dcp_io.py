"""Reading a DCP folder safely: a crafted `.metadata` is refused unrun, a missing or truncated shard is one
line naming the file."""

import os
import pickle

import pytest
import torch

from megatron.checkpoint.dcp_io import METADATA, Chunks, check_files, read_dcp, read_metadata, write_dcp
from megatron.core.errors import UserError


class _Payload:
    """What an attacker pickles: unpickling calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def folder(tmp_path):
    write_dcp({"w": Chunks((4, 3), [(torch.arange(12.0).view(4, 3), (0, 0))]), "b": torch.ones(5)},
              str(tmp_path / "ckpt"), no_dist=True)
    return str(tmp_path / "ckpt")


def test_metadata_round_trip_and_read(folder):
    md = read_metadata(folder)
    out = {"w": torch.zeros(4, 3), "b": torch.zeros(5)}
    read_dcp(out, folder, md, no_dist=True)
    assert torch.equal(out["w"], torch.arange(12.0).view(4, 3)) and torch.equal(out["b"], torch.ones(5))


def test_pickled_payload_in_metadata_is_refused_unrun(folder, tmp_path):
    marker = tmp_path / "ran"
    md = read_metadata(folder)
    md.planner_data = _Payload(str(marker))  # a payload riding inside genuine metadata
    with open(os.path.join(folder, METADATA), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UserError, match=r"refused checkpoint .*\.metadata: it holds a pickled Python object \(posix.system"):
        read_metadata(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_names_the_file(folder, damage):
    md = read_metadata(folder)
    shard = os.path.join(folder, "__0_0.distcp")
    if damage == "missing":
        os.remove(shard)
    else:
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError, match=f"checkpoint shard {shard} is {damage}"):
        check_files(folder, md)


def test_garbage_metadata_is_one_line(folder):
    with open(os.path.join(folder, METADATA), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(UserError, match=r"cannot read .*\.metadata"):
        read_metadata(folder)
