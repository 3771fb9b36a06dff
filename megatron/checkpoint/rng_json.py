"""RNG states (rng.py's dict) as JSON, for the torch_dist format: plain values, nothing to unpickle.

A tensor becomes {"dtype": "uint8", "data": [...]}; tuples become lists (rng.set_rng_state turns the
Python state back into tuples). About 20 KB per rank.
"""

import json

import torch

_TENSOR = "__tensor__"


def _encode(x):
    if isinstance(x, torch.Tensor):
        return {_TENSOR: str(x.dtype).removeprefix("torch."), "data": x.tolist()}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    return x


def _decode(x):
    if isinstance(x, dict):
        if _TENSOR in x:
            dtype = getattr(torch, str(x[_TENSOR]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a dtype: {x[_TENSOR]!r}")
            return torch.tensor(x["data"], dtype=dtype)
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def rng_to_json(state: dict) -> dict:
    return _encode(state)


def rng_from_json(path: str) -> dict:
    with open(path) as f:
        return _decode(json.load(f))
