"""A pipeline stage's model and optimizer as pieces of global, layout-free tensors (for dcp_io.py).

    model.<key>                              the parameter, in its dtype (bf16/fp16 weights under --bf16)
    optimizer.state.fp32_param.<key>         the fp32 main parameter (16-bit runs only: else the weight is it)
    optimizer.state.exp_avg.<key>            Adam's moments, fp32, shaped like the parameter
    optimizer.state.exp_avg_sq.<key>

`<key>` is the unsharded model's name (`LanguageModule.global_param_name`: global layer numbers; the last
stage's copy of tied word embeddings is the embedding itself), and each rank's pieces sit where its
tensor-parallel shard sits in the unsharded tensor, read off the partition tags the layers put on every
parameter (`partition_dim`, `partition_stride`: SwiGLU's fc1 is two blocks per rank). So TP, PP, DP,
sequence parallelism and the distributed optimizer change who offers which piece, never the keys or the
global shapes, and any layout loads any other's checkpoint. The one global size that depends on TP is
the padded vocabulary (a multiple of `--make-vocab-size-divisible-by` x TP): a loader asks for the rows
the checkpoint has and zero-fills padding rows beyond them (rows below the tokenizer's size always
exist), which is what `convert.repad_vocab` does offline.

The distributed optimizer's flat shards are put back into parameter shapes by dcp_optimizer.py.

Glossary: piece a rectangular block of a global tensor (dcp_io.Chunks); tp, tp_rank this stage's
tensor-parallel size and rank.
"""

from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpoint.dcp_io import Chunks
from megatron.checkpoint.layout import VOCAB_BIASES, VOCAB_KEYS, partition_spec

MODEL = "model."
FP32_PARAM = "optimizer.state.fp32_param."
MOMENTS = ("exp_avg", "exp_avg_sq")
_VOCAB = set(VOCAB_KEYS + VOCAB_BIASES)


def moment_prefix(name: str) -> str:
    return f"optimizer.state.{name}."


def blocks_of(t: torch.Tensor, spec, tp_rank: int, tp: int) -> Tuple[torch.Size, List[Tuple[torch.Tensor, list]]]:
    """(global shape, [(view of t, its offsets in the global tensor)]) of a rank's TP shard `t`: one block,
    or `stride` blocks for a strided split (rank r holds its slice of each of the `stride` parts)."""
    if spec is None:
        return t.shape, [(t, [0] * t.dim())]
    dim, stride = spec
    dim %= t.dim()
    local = t.shape[dim]
    part = local // stride  # rows of one block on this rank
    full = local * tp
    shape = list(t.shape)
    shape[dim] = full
    out = []
    for j in range(stride):
        offsets = [0] * t.dim()
        offsets[dim] = j * (full // stride) + tp_rank * part
        out.append((t.narrow(dim, j * part, part), offsets))
    return torch.Size(shape), out


def clip_rows(chunks: Chunks, saved_rows: int) -> Chunks:
    """The loader's pieces of a vocabulary tensor, clipped to the `saved_rows` the checkpoint has (its TP
    padded the vocabulary differently); the rows beyond are left for the caller to zero."""
    blocks = []
    for view, offsets in chunks.blocks:
        keep = max(0, min(view.shape[0], saved_rows - offsets[0]))
        if keep:
            blocks.append((view.narrow(0, 0, keep), offsets))
    return Chunks((saved_rows, *chunks.global_shape[1:]), blocks)


def is_vocab(key: str) -> bool:
    return key in _VOCAB


def global_names(model: torch.nn.Module) -> Dict[int, str]:
    """{id(parameter): its unsharded key} for a stage model (a LanguageModule)."""
    return {id(p): model.global_param_name(name) for name, p in model.named_parameters()}


def param_chunks(t: torch.Tensor, like: torch.nn.Parameter, tp_rank: int, tp: int) -> Chunks:
    """`t` (a tensor shaped like parameter `like`: the weight, its main copy or a moment) as pieces."""
    shape, blocks = blocks_of(t, partition_spec(like), tp_rank, tp)
    return Chunks(shape, blocks)


def host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A CPU tensor of t's values; a copy (`copy`: an asynchronous save, training goes on) or t itself."""
    t = t.detach()
    if copy or t.device.type != "cpu":
        return t.to("cpu", copy=True)
    return t


def model_pieces(model: torch.nn.Module, tp_rank: int, tp: int, copy: bool) -> Dict[str, Chunks]:
    """{model.<key>: pieces} of this rank's parameters."""
    names = global_names(model)
    return {MODEL + names[id(p)]: param_chunks(host(p, copy), p, tp_rank, tp) for p in model.parameters()}


def model_targets(model: torch.nn.Module, tp_rank: int, tp: int, saved: Dict[str, torch.Size]) -> Dict[str, Chunks]:
    """{model.<key>: pieces to fill}: the parameters' own memory, vocabulary rows clipped to the saved ones
    (rows past them, padding, are zeroed here)."""
    names = global_names(model)
    out = {}
    for p in model.parameters():
        key = names[id(p)]
        out[MODEL + key] = targets_for(p.data, p, key, tp_rank, tp, saved.get(MODEL + key))
    return out


def targets_for(t: torch.Tensor, like: torch.nn.Parameter, key: str, tp_rank: int, tp: int,
                saved_shape: Optional[torch.Size]) -> Chunks:
    """Pieces of `t` (shaped like `like`) to load; for a vocabulary tensor saved with other padding, only
    the saved rows, the others zeroed."""
    chunks = param_chunks(t, like, tp_rank, tp)
    if saved_shape is not None and is_vocab(key) and saved_shape[0] != chunks.global_shape[0]:
        with torch.no_grad():
            for view, offsets in chunks.blocks:
                first_new = max(0, min(view.shape[0], saved_shape[0] - offsets[0]))  # rows before it are saved
                view[first_new:].zero_()
        chunks = clip_rows(chunks, saved_shape[0])
    return chunks


def shape_problems(wanted: Dict[str, Chunks], saved: Dict[str, torch.Size]) -> List[str]:
    """The first keys the checkpoint lacks or holds in another shape (another model), as phrases."""
    missing = [k for k in wanted if k not in saved]
    differ = [f"{k} {list(saved[k])} in the checkpoint, {list(w.global_shape)} here"
              for k, w in wanted.items() if k in saved and saved[k] != w.global_shape]
    problems = ([f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")]
                if missing else []) + differ[:3]
    return problems


def saved_shapes(metadata) -> Dict[str, torch.Size]:
    """{key: global size} of every tensor in a DCP checkpoint's metadata."""
    return {k: v.size for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}

