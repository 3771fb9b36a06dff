"""A local Hugging Face `transformers` folder as our checkpoint, in any tensor (TP) x pipeline (PP) layout:
the inverse of hf_export.py, through the same tables (hf_mapping.py).

    result = import_from_hf("hf/gpt2-small", "ckpt/gpt2-small", tp=2, pp=2)   # tools/convert_hf_to_checkpoint.py
    # then: pretrain_gpt_ltd.py ... result.training_flags ... --finetune

Architectures (config.json's `model_type`; anything else, or a feature our model lacks, is refused):

| transformers                              | ours                                                          |
|-------------------------------------------|---------------------------------------------------------------|
| gpt2 (`gelu`, or `gelu_new`: its default) | learned positions + LayerNorm + GELU (`--openai-gelu` for the tanh one), biases |
| llama, mistral                            | RoPE + RMSNorm + SwiGLU, `num_key_value_heads` < heads: GQA    |

Refused, one line each: other architectures (BERT, T5, GPT-NeoX, ...); Qwen2 (biases on q/k/v only);
activations other than GELU (exact or tanh-approximated); RoPE scaling; a sliding window shorter than the context; `attention_bias` without
`mlp_bias` or the reverse (our `--disable-bias-linear` is one switch); a head size other than
hidden/heads; cross-attention; a tokenizer with more ids than the embedding has rows.

Vocabulary. The tokenizer's size T (ids in its tokenizer.json) is the run's true vocabulary; the
embedding (and an untied LM head) gets P = T rounded up to `--make-vocab-size-divisible-by` x TP rows,
as the trainer pads: the HF rows are kept bit for bit, zero rows added, or rows past P trimmed when the
HF model has more (ids >= P the tokenizer never produces; every id < P keeps its logit).

Tokenizer. The folder's tokenizer files are copied into `<save>/tokenizer/`, and the args record
`tokenizer_type: HuggingFaceTokenizer`, `tokenizer_model: "tokenizer"`: a path relative to the
checkpoint folder, which the readers (evaluation, export: megatron/checkpoint/tokenizer.py) also look up
beside the checkpoint, so the folder can move. The trainer reads them (and the model flags) from the
checkpoint with `--use-checkpoint-args`: `training_flags` is `--load <save> --finetune
--use-checkpoint-args` and the layout.

Checkpoint. Iteration 0: no training happened. `--finetune` ignores it; a plain resume is refused for
want of an optimizer state; one with `--no-load-optim --no-load-rng` starts at iteration 0. Written by
convert.write_checkpoint (the trainer's crash-safe protocol) into a temporary sibling folder that is
renamed to `--save` only when everything passed. Weights keep their dtype. Before anything is written
the mapping is checked: the transformers model loaded from the folder and ours built from the new state
dict give the same fp32 logits (1e-4, as the export's check).
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpoint.convert import split_checkpoint, write_checkpoint
from megatron.checkpoint.model_args import args_from_transformer_config, build_model_from_args
from megatron.checkpoint.protocol import CHECKPOINT_VERSION
from megatron.core.errors import UserError
from megatron.core.tokenizer import vocab_size_with_padding
from megatron.core.tokenizer.huggingface import HuggingFaceTokenizer
from megatron.core.transformer.config import TransformerConfig
from megatron.evaluation.hf_mapping import VOCAB_TENSORS, check_logits, from_hf, max_logit_diff, to_hf

ITERATION = 0
TOKENIZER_DIR = "tokenizer"  # under the checkpoint folder; recorded relative to it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
RECORD = "hf_import.json"  # beside the checkpoint: where it came from and the flags to train it
SUPPORTED = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}  # model_type -> our table
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # in this order of preference
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# tensors a transformers file may hold that are not parameters: GPT-2's causal-mask buffers, old RoPE tables
BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


# ---- config.json -> our flags -------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf-dir {hf_dir}: no such folder")
    if not os.path.isfile(path):
        raise UserError(f"--hf-dir {hf_dir} has no config.json; pass a folder saved by transformers' save_pretrained")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}")
    if not isinstance(config, dict):
        raise UserError(f"{path} holds no JSON object")
    return config


def _refuse(c: dict, what: str) -> UserError:
    return UserError(f"{c.get('model_type')} model: {what}; this project's model has no equivalent, so nothing "
                     f"was imported")


def _gpt2_flags(c: dict) -> dict:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise _refuse(c, f"activation_function {act!r} (ours: 'gelu', exact, or the tanh approximation "
                         f"'gelu_new'/'gelu_pytorch_tanh' with --openai-gelu)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if c.get(key, ok) != ok:
            raise _refuse(c, f"{key} {c[key]}")
    h, n = c.get("n_embd", 768), c.get("n_positions", 1024)
    return dict(num_layers=c.get("n_layer", 12), hidden_size=h, num_attention_heads=c.get("n_head", 12),
                ffn_hidden_size=c.get("n_inner") or 4 * h, seq_length=n, max_position_embeddings=n,
                position_embedding_type="learned_absolute", normalization="LayerNorm",
                layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5), swiglu=False, add_bias_linear=True,
                openai_gelu=act != "gelu",
                untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True),
                hidden_dropout=c.get("resid_pdrop", 0.1), attention_dropout=c.get("attn_pdrop", 0.1),
                init_method_std=c.get("initializer_range", 0.02))


def _rope_theta(c: dict) -> int:
    """RoPE's base from `rope_theta` (transformers 4) or `rope_parameters` (5); scaling is refused."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kinds = {params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
    if kinds or set(scaling) - {"rope_type", "type", "rope_theta"}:
        raise _refuse(c, f"RoPE scaling ({', '.join(sorted(kinds)) or 'default'}: {json.dumps(scaling or params)})")
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(c, "partial_rotary_factor < 1")
    theta = params.get("rope_theta", scaling.get("rope_theta", c.get("rope_theta", 10000.0)))
    if float(theta) != int(theta):
        raise _refuse(c, f"rope_theta {theta} (our --rotary-base is an integer)")
    return int(theta)


def _llama_flags(c: dict) -> dict:
    h, nh = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    groups = c.get("num_key_value_heads") or nh
    if c.get("hidden_act", "silu") != "silu":
        raise _refuse(c, f"hidden_act {c['hidden_act']!r} (SwiGLU needs 'silu')")
    if (c.get("head_dim") or h // nh) != h // nh:
        raise _refuse(c, f"head_dim {c['head_dim']} differs from hidden_size / num_attention_heads = {h // nh}")
    if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
        raise _refuse(c, f"attention_bias {c.get('attention_bias', False)} with mlp_bias {c.get('mlp_bias', False)} "
                         f"(our linear biases are all on or all off)")
    n = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if window is not None and window < n:
        raise _refuse(c, f"sliding_window {window} < max_position_embeddings {n} (attention over a sliding window)")
    return dict(num_layers=c.get("num_hidden_layers", 32), hidden_size=h, num_attention_heads=nh,
                num_query_groups=groups, ffn_hidden_size=c.get("intermediate_size", 11008), seq_length=n,
                max_position_embeddings=n, position_embedding_type="rope", rotary_base=_rope_theta(c),
                normalization="RMSNorm", layernorm_epsilon=c.get("rms_norm_eps", 1e-6), swiglu=True,
                add_bias_linear=bool(c.get("attention_bias", False)),
                untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
                hidden_dropout=0.0, attention_dropout=c.get("attention_dropout", 0.0),
                init_method_std=c.get("initializer_range", 0.02))


def hf_to_fields(c: dict) -> Tuple[str, dict]:
    """(our table's name, our TransformerConfig's fields but the vocabulary) for a transformers config.json;
    a UserError for what has no equivalent."""
    kind = c.get("model_type")
    if kind == "qwen2":
        raise _refuse(c, "biases on q/k/v but not on the other linears (Megatron's --add-qkv-bias)")
    if kind not in SUPPORTED:
        names = ", ".join(c.get("architectures") or []) or "no architectures listed"
        raise UserError(f"unsupported Hugging Face architecture {kind!r} ({names}); the import takes decoder-only "
                        f"{', '.join(SUPPORTED)} models")
    if c.get("is_encoder_decoder"):
        raise _refuse(c, "is_encoder_decoder")
    arch = SUPPORTED[kind]
    return arch, _gpt2_flags(c) if arch == "gpt2" else _llama_flags(c)


# ---- weights -------------------------------------------------------------------------------------------
def _load_file(path: str) -> Dict[str, torch.Tensor]:
    """One weights file: safetensors, or a torch pickle read with weights_only (nothing in it is run)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} is missing")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file or a pickled payload: one line
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"cannot read weights file {path} ({type(e).__name__}: {detail}); it is damaged, or holds "
                        f"Python objects that a safe load refuses")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict of tensors")
    return state


def load_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the folder: model.safetensors, pytorch_model.bin, or the shards their index names
    (safetensors first when both are there)."""
    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _load_file(path)
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; it should map tensor names to files")
        weights = {}
        for shard in shards:
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                raise UserError(f"weights file {os.path.join(hf_dir, shard)} is missing (named by {name})")
        for shard in shards:
            weights.update(_load_file(os.path.join(hf_dir, shard)))
        return weights
    raise UserError(f"--hf-dir {hf_dir} holds no weights: none of {', '.join(WEIGHT_FILES)}")


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` [E, h] with `rows` rows: its first rows kept bit for bit, zero rows added or rows past `rows` cut."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])  # [rows, h]


def normalize_weights(weights: Dict[str, torch.Tensor], arch: str,
                      config: TransformerConfig) -> Dict[str, torch.Tensor]:
    """The names the tables use (a base model's file lacks the `transformer.`/`model.` prefix), without
    buffers or a tied head's copy, the vocabulary tensors at our padded size."""
    prefix = {"gpt2": "transformer.", "llama": "model."}[arch]
    if not any(k.startswith(prefix) for k in weights):
        weights = {k if k.startswith("lm_head.") else prefix + k: v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not BUFFERS.search(k)}
    embed, head = VOCAB_TENSORS[arch]
    if not config.untie_embeddings_and_output_weights and head in weights:
        if embed in weights and not torch.equal(weights[head], weights[embed]):
            raise UserError(f"config.json says tie_word_embeddings, but {head} differs from {embed}; fix the config")
        del weights[head]
    for name in (embed, head):
        if name in weights:
            weights[name] = _resize_rows(weights[name], config.vocab_size)
    return weights


def check_weights(weights: Dict[str, torch.Tensor], config: TransformerConfig, arch: str, hf_dir: str) -> None:
    """The tensors `to_hf` writes for `config` (from our model on the meta device): all there, same shapes,
    nothing else; one line naming the first few differences otherwise."""
    meta = build_model_from_args(args_from_transformer_config(config), device="meta", vocab_size=config.vocab_size)
    expected = {k: tuple(v.shape) for k, v in to_hf(meta.state_dict(), config, arch).items()}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {list(weights[k].shape)} (config.json: {list(s)})" for k, s in expected.items()
              if k in weights and tuple(weights[k].shape) != s]
    parts = [f"{what} {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
             for what, items in (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if items]
    if parts:
        raise UserError(f"the weights in {hf_dir} do not fit its config.json: {'; '.join(parts)}")


# ---- the import ----------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    architecture: str  # our table: "gpt2" or "llama"
    model_type: str  # config.json's
    args: dict  # the checkpoint's args
    logit_diff: Optional[float]  # the check's max relative |logit difference|; None with verify=False
    hf_vocab_rows: int  # rows of the HF embedding (before our padding)
    training_flags: List[str]  # pretrain_gpt_ltd.py flags of a fine-tuning run from this checkpoint


def checkpoint_args(config: TransformerConfig, tokenizer_size: int, divisible_by: int, tp: int, pp: int) -> dict:
    """The args a checkpoint of this project holds (Megatron's flag names), as the trainer would save them."""
    args = args_from_transformer_config(config)
    args.update(seq_length=config.seq_length, max_position_embeddings=config.max_position_embeddings,
                padded_vocab_size=config.vocab_size, true_vocab_size=tokenizer_size,
                make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=TOKENIZER_DIR, vocab_file=None, merge_file=None, vocab_size=None)
    return args


def training_flags(args: dict, save: str) -> List[str]:
    """What pretrain_gpt_ltd.py needs to fine-tune from the checkpoint at `save`: the model and tokenizer
    flags come from the checkpoint itself (`--use-checkpoint-args`); the launch layout must be the import's
    (or convert it with tools/checkpoint_util.py). Add --seq-length, data and schedule."""
    return ["--load", save, "--finetune", "--use-checkpoint-args",
            "--tensor-model-parallel-size", str(args["tensor_model_parallel_size"]),
            "--pipeline-model-parallel-size", str(args["pipeline_model_parallel_size"])]


def _verify(hf_dir: str, args: dict, state: dict, vocab: int) -> float:
    """Max relative |logit difference| between transformers' model of the folder and ours from `state`, fp32."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("transformers is not installed, so the import cannot check its logits; install the eval "
                        "extra (pip install -e '.[eval]') or pass --no-verify")
    ours = build_model_from_args(args, hidden_dropout=0.0, attention_dropout=0.0)
    ours.load_state_dict(state, strict=True)
    ours.float().eval()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).float().eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    s = min(args["max_position_embeddings"], 64)
    tokens = torch.randint(0, vocab, (2, s), generator=torch.Generator().manual_seed(0))  # [2, s] real ids
    return max_logit_diff(ours, theirs, tokens)


def import_from_hf(hf_dir: str, save: str, tp: int = 1, pp: int = 1, divisible_by: int = 128,
                   verify: bool = True) -> ImportResult:
    """Write the transformers folder `hf_dir` as our checkpoint `save` at TP=`tp` PP=`pp` (module docstring).
    Everything is read and checked before the first byte is written; a failure leaves no `save`."""
    hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
    save = os.path.abspath(os.path.expanduser(save))
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise UserError(f"--save {save} exists and is not an empty folder; pass a new one")
    hf = read_hf_config(hf_dir)
    arch, fields = hf_to_fields(hf)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise UserError(f"--hf-dir {hf_dir} has no tokenizer.json; save a fast tokenizer into it "
                        f"(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    tokenizer = HuggingFaceTokenizer(tok_path)
    padded = vocab_size_with_padding(tokenizer.vocab_size, divisible_by, tp)
    config = TransformerConfig(vocab_size=padded, **fields)
    rows = hf.get("vocab_size")
    if not isinstance(rows, int) or tokenizer.vocab_size > rows:
        raise UserError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} ids, but the model's embedding has "
                        f"{rows} rows (config.json vocab_size); they belong to different models")
    weights = normalize_weights(load_hf_weights(hf_dir), arch, config)
    check_weights(weights, config, arch, hf_dir)
    state = from_hf(weights, config, arch)  # our unsharded model
    del weights
    args = checkpoint_args(config, tokenizer.vocab_size, divisible_by, tp, pp)
    # train_state: nothing trained or consumed yet, also for a resume with --no-load-optim --no-load-rng
    files = split_checkpoint({"args": args, "model": state, "iteration": ITERATION, "train_state": {"iteration": 0},
                              "checkpoint_version": CHECKPOINT_VERSION}, tp, pp)  # refuses sizes TP/PP cannot split
    diff = None
    if verify:
        diff = _verify(hf_dir, args, state, tokenizer.vocab_size)
        check_logits(diff, f"the imported {hf.get('model_type')} model")
    flags = training_flags(args, save)

    parent = os.path.dirname(save)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-import-", dir=parent)  # written aside, renamed when complete
    try:
        write_checkpoint(tmp, ITERATION, files, pp, report=lambda line: None)
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, TOKENIZER_DIR, name))
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump({"source": hf_dir, "model_type": hf.get("model_type"), "architecture": arch,
                       "iteration": ITERATION, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                       "tokenizer_vocab_size": tokenizer.vocab_size, "hf_vocab_rows": rows, "padded_vocab_size": padded,
                       "logit_diff": diff, "training_flags": flags}, f, indent=2)
        if os.path.isdir(save):
            os.rmdir(save)  # empty (checked above)
        os.replace(tmp, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(arch, hf.get("model_type"), args, diff, rows, flags)
