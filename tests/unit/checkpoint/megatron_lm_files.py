"""Checkpoints as Megatron-LM writes them, made here without Megatron-LM, and the model computed directly.

    full = make_weights(CONFIGS["llama"])                       # unsharded, our names (the truth's input)
    write_megatron_lm(root, full, CONFIGS["llama"], tp=2, pp=2)  # iter_0000100/mp_rank_XX_YYY/model_optim_rng.pt
    logits = reference_logits(full, CONFIGS["llama"], tokens)    # Megatron's forward, written out below

A rank file holds what megatron/training/checkpointing.py `generate_state_dict` saves for an mcore GPT in the
`torch` format: `args` (an argparse.Namespace with Megatron's flag names, derived values filled in as
`validate_args` does, `model_type` and `attention_backend` as Megatron's enums, `params_dtype` a torch dtype),
`checkpoint_version` 3.0, `iteration`, `model` (stage-local layer numbers, TP shards; TransformerEngine
names: each norm fused into the next linear as `layer_norm_weight`/`layer_norm_bias`, and `_extra_state`
entries: io.BytesIO, a uint8 tensor or None), `optimizer`, `opt_param_scheduler`, `rng_state` (a list of
dicts with numpy's RNG state), `num_floating_point_operations_so_far`. Megatron's enums are pickled under
their real module names (`megatron.core.enums.ModelType`): `megatron_modules()` puts stand-in modules there
while saving and removes them afterwards, so a load that needed them would fail.

Shards are cut with our own split (layout.split_model; tests/unit/checkpoint/test_layout.py checks it
against slicing written out by hand), which is Megatron's: contiguous rows of QKV (whole query groups),
fc1 ([gate_r; up_r] per rank under SwiGLU), the vocabulary; contiguous columns of proj and fc2.
"""

import argparse
import contextlib
import enum
import io
import math
import os
import random
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

from megatron.checkpoint.layout import split_model

L, H, NH, S, MAXPOS = 4, 32, 4, 32, 32  # tests/functional/gpt_cli.py TINY's model
VOCAB = 97  # NullTokenizer --vocab-size: 98 ids with EOD
PADDED = 128  # with --make-vocab-size-divisible-by 64 at TP 1 and 2
ITER = 100
CONFIGS = {
    # Llama-like: RoPE, RMSNorm, SwiGLU, untied output, no biases, 2 query groups (GQA)
    "llama": dict(pos="rope", norm="RMSNorm", swiglu=True, bias=False, untie=True, groups=2, gelu=None),
    # GPT-2-like: learned positions, LayerNorm, GELU, biases, tied output, multi-head attention. Megatron
    # fuses the bias into a tanh-approximated GELU (bias_gelu_fusion, its default with biases)
    "gpt2": dict(pos="learned_absolute", norm="LayerNorm", swiglu=False, bias=True, untie=False, groups=None,
                 gelu="tanh"),
}
TE_NORMS = {"input_layernorm": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm": "mlp.linear_fc1.layer_norm_"}


def ffn_size(c):
    return int(4 * H * 2 / 3 / 64) * 64 if c["swiglu"] else 4 * H  # Megatron's defaults


def our_args(c, tp=1, pp=1):
    """Our saved args for config `c` (what layout.split_model reads)."""
    return {"num_layers": L, "hidden_size": H, "num_attention_heads": NH, "ffn_hidden_size": ffn_size(c),
            "group_query_attention": c["groups"] is not None, "num_query_groups": c["groups"],
            "position_embedding_type": c["pos"], "normalization": c["norm"], "swiglu": c["swiglu"],
            "openai_gelu": c["gelu"] == "tanh",
            "disable_bias_linear": not c["bias"], "untie_embeddings_and_output_weights": c["untie"],
            "padded_vocab_size": PADDED, "max_position_embeddings": MAXPOS, "seq_length": S,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}


def make_weights(c, seed=0, scale=0.2):
    """An unsharded state dict in our names with distinct random values (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    hd, ng, f = H // NH, c["groups"] or NH, ffn_size(c)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {"embedding.word_embeddings.weight": rnd(PADDED, H)}
    if c["pos"] == "learned_absolute":
        sd["embedding.position_embeddings.weight"] = rnd(MAXPOS, H)

    def norm(name):
        sd[name + ".weight"] = 1 + rnd(H)
        if c["norm"] == "LayerNorm":
            sd[name + ".bias"] = rnd(H)

    def linear(name, out, inp):
        sd[name + ".weight"] = rnd(out, inp)
        if c["bias"]:
            sd[name + ".bias"] = rnd(out)

    for i in range(L):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.linear_qkv", (NH + 2 * ng) * hd, H)
        linear(p + "self_attention.linear_proj", H, H)
        norm(p + "pre_mlp_layernorm")
        linear(p + "mlp.linear_fc1", 2 * f if c["swiglu"] else f, H)
        linear(p + "mlp.linear_fc2", H, f)
    norm("decoder.final_layernorm")
    if c["untie"]:
        sd["output_layer.weight"] = rnd(PADDED, H)
    return sd


# ---- Megatron's side: names, args, files -------------------------------------------------------------
def te_names(local, extra_states=True):
    """One rank's state dict as megatron-core's TransformerEngine spec names it, with `_extra_state` entries."""
    out = {}
    for name, t in local.items():
        parts = name.split(".")
        if parts[0] == "decoder" and parts[1] == "layers" and parts[3] in TE_NORMS:
            name = ".".join(parts[:3]) + "." + TE_NORMS[parts[3]] + parts[4]
        out[name] = t
    if extra_states:
        fp8 = io.BytesIO()
        torch.save({"scale_fwd": torch.ones(3)}, fp8)  # older TransformerEngine: a BytesIO of a torch.save
        for name in list(out):
            if name.endswith("linear_qkv.weight"):
                out[name.replace(".weight", "._extra_state")] = fp8
            elif name.endswith("linear_proj.weight"):
                state = torch.frombuffer(bytearray(b"te state"), dtype=torch.uint8)  # newer TransformerEngine
                out[name.replace(".weight", "._extra_state")] = state
            elif name.endswith(("linear_fc1.weight", "linear_fc2.weight")):
                out[name.replace(".weight", "._extra_state")] = None
        for name in {n.rsplit(".", 2)[0] for n in out if ".self_attention." in n}:
            out[name + ".core_attention._extra_state"] = None
    return out


def legacy_names(local):
    """One rank's state dict as Megatron-DeepSpeed's legacy GPTModel saves it: nested dicts, its own names."""
    layer = {"input_layernorm": "input_layernorm", "self_attention.linear_qkv": "self_attention.query_key_value",
             "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_layernorm",
             "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}
    embedding, encoder, out = {}, {}, {}
    for name, t in local.items():
        module, leaf = name.rsplit(".", 1)
        if module.startswith("embedding."):
            embedding.setdefault(module.split(".")[1], {})[leaf] = t
        elif module.startswith("decoder.layers."):
            _, _, i, rest = module.split(".", 3)
            encoder[f"layers.{i}.{layer[rest]}.{leaf}"] = t
        elif module == "decoder.final_layernorm":
            encoder[f"final_layernorm.{leaf}"] = t
        else:
            assert module == "output_layer"
            out.setdefault("language_model", {})["output_layer"] = {leaf: t}
    out.setdefault("language_model", {}).update(embedding=embedding, encoder=encoder)
    return out


class ModelType(enum.Enum):  # megatron/core/enums.py
    encoder_or_decoder = 1


class AttnBackend(enum.Enum):  # megatron/core/transformer/enums.py
    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5


class PositionEmbeddingType(enum.Enum):  # Megatron-DeepSpeed's megatron/model/enums.py
    rotary = 1
    absolute = 2
    alibi = 3


ENUMS = {"megatron.core.enums": ModelType, "megatron.core.transformer.enums": AttnBackend,
         "megatron.model.enums": PositionEmbeddingType}


@contextlib.contextmanager
def megatron_modules():
    """Megatron's enum classes under their real module names while pickling, gone again afterwards."""
    added = []
    for module, cls in ENUMS.items():
        if module not in sys.modules:
            sys.modules[module] = types.ModuleType(module)
            added.append(module)
        setattr(sys.modules[module], cls.__name__, cls)
        cls.__module__ = module
    try:
        yield
    finally:
        for module in added:
            del sys.modules[module]


def namespace(c, tp=1, pp=1, **changes):
    """args as Megatron-LM saves them for config `c` (after validate_args), Megatron's flag names."""
    groups = c["groups"] or 1
    a = dict(
        num_layers=L, encoder_num_layers=L, hidden_size=H, num_attention_heads=NH, ffn_hidden_size=ffn_size(c),
        kv_channels=H // NH, group_query_attention=c["groups"] is not None, num_query_groups=groups,
        seq_length=S, max_position_embeddings=MAXPOS, position_embedding_type=c["pos"],
        use_rotary_position_embeddings=False, rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, normalization=c["norm"],
        layernorm_epsilon=1e-5, layernorm_zero_centered_gamma=False, swiglu=c["swiglu"],
        gated_linear_unit=c["swiglu"], openai_gelu=False, squared_relu=False, add_bias_linear=c["bias"],
        add_qkv_bias=c["bias"], bias_gelu_fusion=c["bias"], untie_embeddings_and_output_weights=c["untie"],
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=False, qk_layernorm=False,
        multi_latent_attention=False, num_experts=None, moe_router_topk=2, moe_layer_freq=1, mtp_num_layers=None,
        window_size=None, softmax_type="vanilla", num_layers_per_virtual_pipeline_stage=None,
        virtual_pipeline_model_parallel_size=None, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, pipeline_model_parallel_layout=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=1,
        expert_model_parallel_size=1, data_parallel_size=1, world_size=tp * pp, rank=0,
        tokenizer_type="NullTokenizer", vocab_size=VOCAB, vocab_file=None, merge_file=None, tokenizer_model=None,
        make_vocab_size_divisible_by=64, padded_vocab_size=PADDED, init_method_std=0.02, hidden_dropout=0.1,
        attention_dropout=0.1, transformer_impl="transformer_engine", ckpt_format="torch", use_dist_ckpt=False,
        params_dtype=torch.float32, main_grads_dtype=torch.float32, model_type=ModelType.encoder_or_decoder,
        attention_backend=AttnBackend.auto, lr=3e-4, min_lr=3e-5, micro_batch_size=2, global_batch_size=4,
        train_iters=500, consumed_train_samples=ITER * 4, consumed_valid_samples=40, data_path=["corpus"],
        recompute_modules=["core_attn"], bf16=False, fp16=False)
    a.update(changes)
    return argparse.Namespace(**a)


def rank_payload(args, model, iteration=ITER):
    """One rank's file as generate_state_dict builds it (torch format)."""
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
            "optimizer": {"optimizer": {"state": {0: {"step": torch.tensor(ITER), "exp_avg": torch.zeros(3)}},
                                        "param_groups": [{"lr": 3e-4, "params": [0]}]},
                          "fp32_from_fp16_params": [[torch.zeros(3)]], "grad_scaler": None},
            "opt_param_scheduler": {"max_lr": 3e-4, "lr_warmup_steps": 10, "num_steps": ITER * 4,
                                    "lr_decay_style": "cosine", "lr_decay_steps": 2000, "min_lr": 3e-5},
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(),
                           "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
                           "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}],
            "num_floating_point_operations_so_far": 1.5e15}


def write_megatron_lm(root, full, c, tp=1, pp=1, names=te_names, iteration=ITER, args=None, edit=None):
    """Megatron-LM's legacy `torch` checkpoint of the unsharded `full` (our names) at TP x PP under `root`.
    `edit(tp_rank, stage, payload)` may change a rank's file before it is saved. Returns `root`."""
    shards = split_model(full, our_args(c), tp, pp)
    with megatron_modules():
        for (t, p), local in shards.items():
            payload = rank_payload(args or namespace(c, tp, pp, rank=t + p * tp), names(local), iteration)
            if edit is not None:
                edit(t, p, payload)
            rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            folder = os.path.join(str(root), f"iter_{iteration:07d}", rank)
            os.makedirs(folder)
            torch.save(payload, os.path.join(folder, "model_optim_rng.pt"))
    with open(os.path.join(str(root), "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return root


# ---- the truth: Megatron's forward, written out ---------------------------------------------------------
def _norm(x, sd, name, c):
    if c["norm"] == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[name + ".weight"]
    return F.layer_norm(x, (H,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)


def _linear(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _rope(x, s, base=10000):
    """megatron/core/models/common/embeddings/rotary_pos_embedding.py (not interleaved): x [b, s, n, hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)  # [s, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, s, 1, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def megatron_attention(x, sd, p, c):
    """megatron/core/transformer/attention.py `get_query_key_value_tensors` + DotProductAttention, on one
    rank holding every query group: linear_qkv's output viewed as [b, s, ng, (np/ng + 2) * hn] and split
    into np/ng query heads, one key and one value head per group."""
    b, s, _ = x.shape
    hd, ng = H // NH, c["groups"] or NH
    mixed = _linear(x, sd, p + "self_attention.linear_qkv").view(b, s, ng, (NH // ng + 2) * hd)
    q, k, v = torch.split(mixed, [NH // ng * hd, hd, hd], dim=3)
    q = q.reshape(b, s, NH, hd)  # [b, s, np, hn]
    if c["pos"] == "rope":
        q, k = _rope(q, s), _rope(k, s)
    k, v = k.repeat_interleave(NH // ng, dim=2), v.repeat_interleave(NH // ng, dim=2)  # [b, s, np, hn]
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    context = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, H)
    return _linear(context, sd, p + "self_attention.linear_proj")


def reference_logits(full, c, tokens):
    """Logits [b, s, V] of the model `full` (our names, unsharded) computed as Megatron computes them."""
    sd = {k: v.double() for k, v in full.items()}
    x = sd["embedding.word_embeddings.weight"][tokens]  # [b, s, h]
    if c["pos"] == "learned_absolute":
        x = x + sd["embedding.position_embeddings.weight"][: tokens.shape[1]]
    for i in range(L):
        p = f"decoder.layers.{i}."
        x = x + megatron_attention(_norm(x, sd, p + "input_layernorm", c), sd, p, c)
        y = _linear(_norm(x, sd, p + "pre_mlp_layernorm", c), sd, p + "mlp.linear_fc1")
        if c["swiglu"]:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate=c["gelu"])  # Megatron's bias_gelu_impl: tanh
        x = x + _linear(y, sd, p + "mlp.linear_fc2")
    x = _norm(x, sd, "decoder.final_layernorm", c)
    out = sd["output_layer.weight"] if c["untie"] else sd["embedding.word_embeddings.weight"]
    return (x @ out.T).float()
