"""Our GPT's parameters <-> `transformers`' GPT-2 and Llama parameters: one table per architecture, read
in both directions (hf_export.py writes with `to_hf`, hf_import.py reads with `from_hf`), and the logit
check both use.

Glossary: h hidden, f FFN hidden, nh query heads, G query groups (key/value heads; G = nh without
grouped-query attention), nq = nh/G query heads per group, hd head dimension, V padded vocabulary.

Layouts that differ (everything else is the same tensor under another name):
  - QKV. Ours is one `[G*(nq+2)*hd, h]` matrix whose rows are grouped per query group: the group's nq
    query heads, then its key head, then its value head (megatron/core/transformer/attention.py).
    Llama has separate q `[nh*hd, h]`, k and v `[G*hd, h]` (key head g serves query heads g*nq ..
    (g+1)*nq - 1, as ours); GPT-2 one Conv1D `c_attn` whose columns are `[q | k | v]`, each `[nh, hd]`.
    Llama's q/k rows are in the rotate-half order our RoPE uses, so no permutation is needed.
  - GPT-2's Conv1D layers store `[in, out]`, the transpose of our `[out, in]`.
  - SwiGLU: our fc1 rows are `[gate; up]`, Llama's gate_proj and up_proj.
  - Biases. GPT-2 has every linear bias; exporting a model trained with `--disable-bias-linear` writes
    zeros (the same function). Llama has them when `attention_bias` (q, k, v, o) and `mlp_bias` are set:
    both are our `add_bias_linear`.
"""

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from megatron.core.errors import UserError
from megatron.core.transformer.config import TransformerConfig

# How a tensor maps (ours <-> theirs):
#   copy       the same tensor
#   t          transposed (GPT-2's Conv1D)
#   qkv        our grouped QKV rows <-> three tensors q, k, v
#   qkv_cat    our grouped QKV rows <-> one tensor with rows [q; k; v]
#   qkv_cat_t  the same, transposed: columns [q | k | v] (GPT-2's c_attn weight)
#   gate_up    our SwiGLU fc1 rows [gate; up] <-> two tensors gate, up
Rule = Tuple[str, str, str]  # (our name, their name(s) comma-separated, how); {i} is the layer number


@dataclass(frozen=True)
class Table:
    top: Tuple[Rule, ...]  # outside the layers
    layer: Tuple[Rule, ...]  # every layer {i}; linear biases are listed in `biases`
    biases: Tuple[Rule, ...]  # linear biases: ours with add_bias_linear
    bias_always: bool  # their model always has the linear biases (zeros when ours has none)
    output: Rule  # the untied LM head


GPT2 = Table(
    top=(("embedding.word_embeddings.weight", "transformer.wte.weight", "copy"),
         ("embedding.position_embeddings.weight", "transformer.wpe.weight", "copy"),
         ("decoder.final_layernorm.weight", "transformer.ln_f.weight", "copy"),
         ("decoder.final_layernorm.bias", "transformer.ln_f.bias", "copy")),
    layer=(("decoder.layers.{i}.input_layernorm.weight", "transformer.h.{i}.ln_1.weight", "copy"),
           ("decoder.layers.{i}.input_layernorm.bias", "transformer.h.{i}.ln_1.bias", "copy"),
           ("decoder.layers.{i}.self_attention.linear_qkv.weight", "transformer.h.{i}.attn.c_attn.weight", "qkv_cat_t"),
           ("decoder.layers.{i}.self_attention.linear_proj.weight", "transformer.h.{i}.attn.c_proj.weight", "t"),
           ("decoder.layers.{i}.pre_mlp_layernorm.weight", "transformer.h.{i}.ln_2.weight", "copy"),
           ("decoder.layers.{i}.pre_mlp_layernorm.bias", "transformer.h.{i}.ln_2.bias", "copy"),
           ("decoder.layers.{i}.mlp.linear_fc1.weight", "transformer.h.{i}.mlp.c_fc.weight", "t"),
           ("decoder.layers.{i}.mlp.linear_fc2.weight", "transformer.h.{i}.mlp.c_proj.weight", "t")),
    biases=(("decoder.layers.{i}.self_attention.linear_qkv.bias", "transformer.h.{i}.attn.c_attn.bias", "qkv_cat"),
            ("decoder.layers.{i}.self_attention.linear_proj.bias", "transformer.h.{i}.attn.c_proj.bias", "copy"),
            ("decoder.layers.{i}.mlp.linear_fc1.bias", "transformer.h.{i}.mlp.c_fc.bias", "copy"),
            ("decoder.layers.{i}.mlp.linear_fc2.bias", "transformer.h.{i}.mlp.c_proj.bias", "copy")),
    bias_always=True,
    output=("output_layer.weight", "lm_head.weight", "copy"),
)

_QKV = ",".join(f"model.layers.{{i}}.self_attn.{n}_proj.{{w}}" for n in "qkv")
_GATE_UP = ",".join(f"model.layers.{{i}}.mlp.{n}_proj.{{w}}" for n in ("gate", "up"))
LLAMA = Table(
    top=(("embedding.word_embeddings.weight", "model.embed_tokens.weight", "copy"),
         ("decoder.final_layernorm.weight", "model.norm.weight", "copy")),
    layer=(("decoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "copy"),
           ("decoder.layers.{i}.self_attention.linear_qkv.weight", _QKV.replace("{w}", "weight"), "qkv"),
           ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", "copy"),
           ("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
           ("decoder.layers.{i}.mlp.linear_fc1.weight", _GATE_UP.replace("{w}", "weight"), "gate_up"),
           ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight", "copy")),
    biases=(("decoder.layers.{i}.self_attention.linear_qkv.bias", _QKV.replace("{w}", "bias"), "qkv"),
            ("decoder.layers.{i}.self_attention.linear_proj.bias", "model.layers.{i}.self_attn.o_proj.bias", "copy"),
            ("decoder.layers.{i}.mlp.linear_fc1.bias", _GATE_UP.replace("{w}", "bias"), "gate_up"),
            ("decoder.layers.{i}.mlp.linear_fc2.bias", "model.layers.{i}.mlp.down_proj.bias", "copy")),
    bias_always=False,
    output=("output_layer.weight", "lm_head.weight", "copy"),
)
TABLES = {"gpt2": GPT2, "llama": LLAMA}
VOCAB_TENSORS = {"gpt2": ("transformer.wte.weight", "lm_head.weight"),  # their [V, h] tensors
                 "llama": ("model.embed_tokens.weight", "lm_head.weight")}


def rules(arch: str, config: TransformerConfig, biases: bool) -> Iterator[Tuple[str, List[str], str]]:
    """(our name, their names, how) for every tensor of `config`'s model; linear biases with `biases`."""
    table = TABLES[arch]
    for ours, theirs, how in table.top:
        if ours != "embedding.position_embeddings.weight" or config.position_embedding_type == "learned_absolute":
            yield ours, theirs.split(","), how
    for i in range(config.num_layers):
        for ours, theirs, how in table.layer + (table.biases if biases else ()):
            yield ours.format(i=i), theirs.format(i=i).split(","), how
    if config.untie_embeddings_and_output_weights:
        yield table.output[0], table.output[1].split(","), table.output[2]


# ---- the layouts that differ ---------------------------------------------------------------------------
def split_groups(t: torch.Tensor, config: TransformerConfig):
    """Our per-group fused rows `[G*(nq+2)*hd, ...]` -> q `[nh*hd, ...]`, k and v `[G*hd, ...]`."""
    G, hd = config.num_query_groups, config.head_dim
    nq = config.num_attention_heads // G
    t = t.view(G, nq + 2, hd, *t.shape[1:])  # [G, nq + 2, hd, ...]
    return (t[:, :nq].reshape(-1, *t.shape[3:]), t[:, nq].reshape(-1, *t.shape[3:]),
            t[:, nq + 1].reshape(-1, *t.shape[3:]))


def join_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """The inverse of `split_groups`: q `[nh*hd, ...]`, k and v `[G*hd, ...]` -> `[G*(nq+2)*hd, ...]`."""
    G, hd = config.num_query_groups, config.head_dim
    nq = config.num_attention_heads // G
    rest = q.shape[1:]
    q = q.reshape(G, nq, hd, *rest)  # [G, nq, hd, ...]
    k, v = k.reshape(G, 1, hd, *rest), v.reshape(G, 1, hd, *rest)  # [G, 1, hd, ...] each
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [G*(nq+2)*hd, ...]


def _theirs(t: torch.Tensor, how: str, config: TransformerConfig) -> List[torch.Tensor]:
    if how == "copy":
        return [t]
    if how == "t":
        return [t.t()]
    if how == "qkv":
        return list(split_groups(t, config))
    if how in ("qkv_cat", "qkv_cat_t"):
        t = torch.cat(split_groups(t, config))  # [(nh + 2G)*hd, ...]: rows q, k, v
        return [t.t() if how == "qkv_cat_t" else t]
    assert how == "gate_up", how
    return list(t.chunk(2))  # [f, ...] each


def _ours(ts: List[torch.Tensor], how: str, config: TransformerConfig) -> torch.Tensor:
    if how == "copy":
        return ts[0]
    if how == "t":
        return ts[0].t().contiguous()
    if how == "qkv":
        return join_groups(*ts, config)
    if how in ("qkv_cat", "qkv_cat_t"):
        t = ts[0].t() if how == "qkv_cat_t" else ts[0]  # [(nh + 2G)*hd, ...]
        kv = config.num_query_groups * config.head_dim
        return join_groups(*t.split([config.hidden_size, kv, kv]), config)
    assert how == "gate_up", how
    return torch.cat(ts)  # [2f, ...]


def to_hf(state: Dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> Dict[str, torch.Tensor]:
    """Our unsharded GPT state dict -> the transformers model's (`arch` "gpt2" or "llama")."""
    table, out = TABLES[arch], {}
    for ours, theirs, how in rules(arch, config, biases=True):
        t = state.get(ours)
        if t is None:  # a linear bias of a model without them
            if not table.bias_always:
                continue
            weight = state[ours[:-len("bias")] + "weight"]  # [out, in]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        out.update(zip(theirs, _theirs(t, how, config)))
    return out


def from_hf(weights: Dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> Dict[str, torch.Tensor]:
    """The transformers model's state dict -> our unsharded GPT's. The caller has checked that `weights`
    holds every tensor `to_hf` writes for `config`, with those shapes (see hf_import.check_weights)."""
    return {ours: _ours([weights[n] for n in theirs], how, config)
            for ours, theirs, how in rules(arch, config, biases=config.add_bias_linear)}


def gpt2_state_dict(state: dict, config: TransformerConfig) -> Dict[str, torch.Tensor]:
    """Our GPT state dict -> GPT2LMHeadModel's (Conv1D weights are [in, out])."""
    return to_hf(state, config, "gpt2")


def llama_state_dict(state: dict, config: TransformerConfig) -> Dict[str, torch.Tensor]:
    """Our GPT state dict -> LlamaForCausalLM's (separate q/k/v, fc1 split into gate and up)."""
    return to_hf(state, config, "llama")


# ---- the logit check of both directions ------------------------------------------------------------
@torch.no_grad()
def max_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Largest |logit difference| between our GPTModel and a transformers model, both run in fp32 on CPU,
    relative to the largest |logit| where that exceeds 1 (fp32 rounding grows with the logits' scale).
    Compared over the ids both have (an import pads or trims the rows past the tokenizer's ids)."""
    a, b = ours(tokens).float(), theirs(tokens).logits.float()  # [b, s, V], [b, s, V']
    n = min(a.shape[-1], b.shape[-1])
    a, b = a[..., :n], b[..., :n]  # [b, s, n]
    return ((a - b).abs().max() / a.abs().max().clamp(min=1.0)).item()


def check_logits(diff: float, what: str, tolerance: float = 1e-4) -> None:
    if not diff <= tolerance:  # also NaN
        raise UserError(f"{what} gives logits {diff:.2e} away from our model's (> {tolerance}); nothing was "
                        f"written; please report this with the checkpoint's args")
