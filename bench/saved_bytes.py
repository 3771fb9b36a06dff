"""Bytes autograd keeps for backward, by transformer layer and by part of a layer, counted through
`torch.autograd.graph.saved_tensors_hooks` (bench/memory.py's `--measure`).

A storage counts once, however many views of it are saved; parameters never count. Parts of a layer:
"sequence" (norms, dropout masks, the residual: what TP replicates and sequence parallelism splits),
"tensor" (the TP-split attention and MLP), "routing" (random-LTD's gather or route between layers).
"""

import dataclasses
from collections import Counter
from typing import Dict, List

import torch

from megatron.core.random_ltd import sequence_parallel as ltd_sequence_parallel

PARTS = ("sequence", "tensor", "routing")  # of a layer's activations


def storages(tensors) -> Dict[int, int]:
    """{storage data_ptr: bytes}: views of one storage count once."""
    out = {}
    for x in tensors:
        st = x.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


class SavedTensorMeter:
    """Bytes autograd keeps for backward during one forward, by transformer layer (global number) or
    "outside" (embedding, final norm, head, loss), and within a layer by PARTS. A storage counts once, for
    the layer that saved it first; parameters never count.

    Layer i's share is what is saved while it runs, plus what is saved in the gap before it (the LTD
    gather or route) or, with full recompute, in the gap after it: the checkpoint is a custom autograd
    Function, which packs its saved input when its forward returns, after the layers it ran. The part is
    the innermost of the layer's modules running when the tensor was saved: a norm, a column-parallel GEMM
    (it saves its input, a norm's output) or the layer's own code (dropout masks) is "sequence"; the rest
    of attention and the MLP is "tensor"; the gap is "routing" (full recompute: "sequence", the layer's
    input). The sequence-parallel LTD route is not a saved tensor but attributes of the routing Functions'
    autograd nodes (and of the micro-batch's random-LTD state); it is counted when used with grad enabled
    (the nodes then keep it until backward)."""

    def __init__(self, model, full_recompute: bool):
        self.skip = set(storages(model.parameters()))
        self.full_recompute = full_recompute
        self.seen, self.bytes, self.segment, self.done = set(), Counter(), None, False  # bytes: (segment, part)
        self.parts: List[str] = []  # innermost last: the part of the running module
        decoder, layers = model.decoder, list(model.decoder.layers)
        after = [layer.layer_number for layer in layers[1:]] + ["outside"]
        self.handles = [decoder.register_forward_pre_hook(lambda *_: self._enter(layers[0].layer_number)),
                        decoder.register_forward_hook(lambda *_: self._enter("outside"))]
        if decoder.final_layernorm is not None:
            self.handles.append(decoder.final_layernorm.register_forward_pre_hook(lambda *_: self._enter("outside")))
        for layer, nxt in zip(layers, after):
            self.handles.append(layer.register_forward_pre_hook(lambda *_, k=layer.layer_number: self._enter(k)))
            owner = layer.layer_number if full_recompute else nxt
            self.handles.append(layer.register_forward_hook(lambda *_, k=owner: self._enter(k)))
            for module, part in ((layer, "sequence"), (layer.self_attention, "tensor"), (layer.mlp, "tensor"),
                                 (layer.input_layernorm, "sequence"), (layer.pre_mlp_layernorm, "sequence"),
                                 (layer.self_attention.linear_qkv, "sequence"), (layer.mlp.linear_fc1, "sequence")):
                self.handles += [module.register_forward_pre_hook(lambda *_, p=part: self.parts.append(p)),
                                 module.register_forward_hook(lambda *_: self._leave())]
        self.real_route = ltd_sequence_parallel._ToListOwners.apply
        ltd_sequence_parallel._ToListOwners.apply = self._route

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        ltd_sequence_parallel._ToListOwners.apply = self.real_route

    def _enter(self, segment) -> None:
        if self.segment is not None:
            self.segment = segment

    def _leave(self) -> None:  # returns None: a forward hook's result would replace the module's output
        self.parts.pop()

    def _count(self, x: torch.Tensor) -> None:
        st = x.untyped_storage()
        ptr = st.data_ptr()
        if self.segment is not None and ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            part = self.parts[-1] if self.parts else "sequence" if self.full_recompute else "routing"
            self.bytes[self.segment, part] += st.nbytes()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        return x

    def _route(self, chunk: torch.Tensor, route):
        """The route's index tensors, counted by their own bytes: the plan's routes are slices of one buffer
        (an iteration's indices and routes travel in one copy), so their storage would overcount."""
        if torch.is_grad_enabled() and self.segment is not None:  # else no autograd node keeps it
            for field in dataclasses.fields(route):
                value = getattr(route, field.name)
                key = ("route", value.data_ptr(), value.numel()) if isinstance(value, torch.Tensor) else None
                if key is not None and value.numel() and key not in self.seen:
                    self.seen.add(key)
                    self.bytes[self.segment, "routing"] += value.numel() * value.element_size()
        return self.real_route(chunk, route)

    def by_layer(self) -> Dict[str, Dict[str, int]]:
        """{layer: {part: bytes}} ("outside" has one part, "sequence")."""
        out: Dict[str, Dict[str, int]] = {}
        for (segment, part), v in self.bytes.items():
            out.setdefault(str(segment), dict.fromkeys(PARTS, 0))[part] += v
        return out

    def wrap(self, forward_step):
        """forward_step whose first call (the first micro-batch) is metered."""
        def step(data_iterator, model):
            if self.done:
                return forward_step(data_iterator, model)
            self.segment = "outside"
            try:
                with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x):
                    return forward_step(data_iterator, model)
            finally:
                self.segment, self.done = None, True
        return step
