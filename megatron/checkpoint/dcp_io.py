"""PyTorch's distributed checkpoint (DCP) engine, taught two things: any rectangular piece of a global tensor,
and reading `.metadata` without running pickled code.

    chunks = Chunks(global_shape, [(local view, its offsets in the global tensor), ...])
    write_dcp({"model.decoder.layers.3.mlp.linear_fc1.weight": chunks, ...}, folder, group)
    metadata = read_metadata(folder)            # safe: only DCP's own record classes are built
    read_dcp({key: Chunks(saved_shape, [(view to fill, offsets)])}, folder, metadata, group)

Why `Chunks` and not DTensor: our tensor-parallel splits are not all DTensor placements. SwiGLU's fc1
holds two separate row blocks of the global [2f, h] matrix on each rank (partition stride 2), the padded
vocabulary makes the last rank's rows partly padding (a loader at another TP asks for a clipped range),
and the distributed optimizer writes a parameter's state from one data-parallel rank only. A `Chunks`
is a list of (view, offsets): DCP's planner asks such an object for its write items and chunk list
(`__create_write_items__`, `__create_chunk_list__`, the hooks DTensor itself implements), and our
planners hand DCP the view for each offset. Every rank passes its own pieces; DCP keeps one copy of
pieces several ranks offer with the same offsets (data-parallel replicas, TP-replicated norms) and
spreads those writes over the ranks (`dedup_save_plans`). Loading reads whatever saved pieces overlap
each requested piece: that is the resharding, for any TP x PP x DP.

Safety: DCP reads `.metadata` with `pickle.load`, so a crafted file would run code; `read_metadata`
unpickles it with an allowlist (DCP's metadata records, torch.Size, dtypes, paths) and refuses anything
else unrun. Tensor data is read by DCP with `torch.load(weights_only=True)`, and we never store or
request a non-tensor (pickled "bytes") item: the plain values go to JSON beside the shards.

Glossary: fqn the flat key of one global tensor; chunk a rectangular piece of it (offsets, sizes).
"""

import contextlib
import os
import pickle
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron.core.errors import UserError

METADATA = ".metadata"  # DCP's index of every chunk, written last by its coordinator (rank 0)


class Chunks:
    """This rank's pieces of one global tensor of shape `global_shape`: [(view, offsets)], each view a
    rectangular block starting at `offsets`. For saving the views are read; for loading they are filled."""

    def __init__(self, global_shape: Sequence[int], blocks: List[Tuple[torch.Tensor, Sequence[int]]]):
        self.global_shape = torch.Size(global_shape)
        self.blocks = [(t, torch.Size(off)) for t, off in blocks]
        for t, off in self.blocks:
            assert len(off) == t.dim() == len(self.global_shape), "a block must have the global tensor's rank"
            assert all(o + n <= g for o, n, g in zip(off, t.shape, self.global_shape)), \
                f"block at {list(off)} of size {list(t.shape)} lies outside {list(self.global_shape)}"

    def size(self) -> torch.Size:  # what DCP compares with the saved size
        return self.global_shape

    def __create_write_items__(self, fqn: str, obj: Any) -> List[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=t.size()),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.global_shape))
                for t, off in self.blocks if t.numel() > 0]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=t.size()) for t, off in self.blocks if t.numel() > 0]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for t, off in self.blocks:
            if off == index.offset:
                return t
        raise ValueError(f"{index.fqn} has no block at {list(index.offset or ())}")


def _piece(state_dict: dict, index: MetadataIndex):
    obj = state_dict[index.fqn]
    return obj.__get_tensor_shard__(index) if isinstance(obj, Chunks) else None


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        piece = _piece(self.state_dict, index)
        return super().lookup_object(index) if piece is None else piece


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata: Optional[Metadata] = None, is_coordinator: bool = False):
        # the default would first pass every value through `_init_state_dict`, which turns objects it does
        # not know (a Chunks) into None; our state dicts are flat and hold no meta tensors to initialise
        self.original_state_dict = self.state_dict = state_dict
        self.mappings = {}
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        piece = _piece(self.state_dict, index)
        return super().lookup_tensor(index) if piece is None else piece


# ---- .metadata without running code ----------------------------------------------------------------------
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup, as torch's own safe loader allows
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _Refused(pickle.UnpicklingError):
    """A class or function outside the allowlist: the name, never looked up."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch.Size and dtypes; any other class or function is refused."""

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ())
        if module == "torch":
            allowed = name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata  # read once, safely, by read_metadata() below


def read_metadata(folder: str) -> Metadata:
    """The `.metadata` of a DCP folder, unpickled with the allowlist; a UserError names the file when it is
    missing, damaged or carries anything but DCP's records (which is never run)."""
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: the torch_dist checkpoint in {folder} is incomplete")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise UserError(f"refused checkpoint {path}: it holds a pickled Python object ({e}), which is never "
                        "run; DCP metadata holds only DCP's own records") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        raise UserError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); the file "
                        "is damaged or not a DCP checkpoint") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"{path} is not DCP metadata ({type(metadata).__name__})")
    return metadata


def check_files(folder: str, metadata: Metadata, fqns: Optional[set] = None) -> None:
    """Every data file the metadata names (for `fqns`, default all) is there and long enough: a missing or
    truncated shard is one line naming the file, before anything is loaded."""
    need = {}
    for index, info in metadata.storage_data.items():
        if fqns is None or index.fqn in fqns:
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint shard {path} is missing: the torch_dist checkpoint is incomplete")
        size = os.path.getsize(path)
        if size < end:
            raise UserError(f"checkpoint shard {path} is truncated ({size} bytes, the metadata needs {end}); the "
                            "torch_dist checkpoint is damaged")


# ---- write and read ---------------------------------------------------------------------------------------
def write_dcp(state: dict, folder: str, group=None, no_dist: bool = False) -> None:
    """Every rank of `group` calls it with its pieces; one file per rank (`__<rank>_0.distcp`), each fsynced,
    then `.metadata` (rank 0, written through a temporary file, fsynced, renamed)."""
    writer = dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True)
    with _one_process(no_dist) as alone:
        dcp.save(state, storage_writer=writer, planner=_SavePlanner(), process_group=group, no_dist=alone)


@contextlib.contextmanager
def _one_process(no_dist: bool):
    """True in one process (the tools, a single-process run): DCP then runs without collectives, and its
    warning that it does so is not for our users."""
    alone = no_dist or not (dist.is_available() and dist.is_initialized())
    if not alone:
        yield False
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield True


def read_dcp(state: dict, folder: str, metadata: Metadata, group=None, no_dist: bool = False) -> None:
    """Fill `state` (views in `Chunks`, or plain tensors of the saved size) from a DCP folder whose
    metadata `read_metadata` already read; a damaged shard is one line."""
    reader = _SafeReader(folder)
    reader._metadata = metadata
    try:
        with _one_process(no_dist) as alone:
            dcp.load(state, storage_reader=reader, planner=_LoadPlanner(), process_group=group, no_dist=alone)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file: one line that names the folder
        detail = " ".join(str(e).split())
        raise UserError(f"cannot read the torch_dist checkpoint {folder}: {detail[:300]}") from None
