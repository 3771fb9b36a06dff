"""Our GPT checkpoint as a Hugging Face `transformers` folder: weights, config, tokenizer, generation config.

    gpt = load_gpt_checkpoint("runs/gpt/checkpoints")
    export_to_hf(gpt, "hf/")   # then AutoModelForCausalLM.from_pretrained("hf/"), AutoTokenizer likewise

Architectures (ours -> theirs; anything else has no exact equivalent and is refused):

| ours                                             | transformers      |
|--------------------------------------------------|-------------------|
| learned positions + LayerNorm + GELU MLP         | GPT-2 (`gelu`, exact erf; `gelu_new` with --openai-gelu) |
| RoPE (rotate-half) + RMSNorm + SwiGLU MLP        | Llama (`attention_bias`/`mlp_bias` = our linear biases) |

Weight layout (QKV grouping, GPT-2's transposed Conv1D, SwiGLU's [gate; up], biases): the tables in
`hf_mapping.py`, which the import (`hf_import.py`) reads the other way. GPT-2 has no grouped-query
attention, and Llama no partial rotary embeddings (`--rotary-percent` < 1): both are refused.

Vocabulary. The exported embedding keeps our padded vocabulary (`V` rows), so the logits are ours
exactly; the padded ids (>= the tokenizer's size) are listed in the generation config's
`suppress_tokens`, so `generate` never emits them, as our lm-eval adapter does not.

Tokenizer: a `tokenizer.json` that encodes exactly as ours (GPT-2 BPE, HuggingFace, SentencePiece BPE
or unigram, NullTokenizer), written by `megatron.evaluation.hf_tokenizer`.

Checks (`export_to_hf`): the mapping is verified in fp32 in memory before the cast, the saved folder is
loaded back and compared with our model rounded to the saved dtype, and the folder appears only after
both passed (written aside, then renamed).
"""

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.core.errors import UserError
from megatron.core.transformer.config import TransformerConfig
from megatron.evaluation.hf_mapping import check_logits as _check
from megatron.evaluation.hf_mapping import gpt2_state_dict, llama_state_dict  # noqa: F401 (export's names)
from megatron.evaluation.hf_mapping import max_logit_diff as _max_diff
from megatron.evaluation.hf_tokenizer import save_tokenizer, tokenizers_object

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_architecture(config: TransformerConfig) -> str:
    """'gpt2' or 'llama' for `config`; a UserError naming the mismatch otherwise."""
    c = config
    if (c.position_embedding_type, c.normalization, c.swiglu) == ("learned_absolute", "LayerNorm", False):
        if c.num_query_groups != c.num_attention_heads:
            raise UserError(f"GPT-2 has no grouped-query attention (--num-query-groups {c.num_query_groups}); "
                            f"export it as Llama (rope + RMSNorm + --swiglu) or train without it")
        return "gpt2"
    if (c.position_embedding_type, c.normalization, c.swiglu) == ("rope", "RMSNorm", True):
        if c.rotary_percent != 1.0:
            raise UserError(f"Llama rotates whole heads; --rotary-percent {c.rotary_percent:g} has no equivalent")
        return "llama"
    raise UserError(
        f"no Hugging Face architecture matches --position-embedding-type {c.position_embedding_type}, "
        f"--normalization {c.normalization}, {'SwiGLU' if c.swiglu else 'GELU'} MLP; supported: learned_absolute "
        f"+ LayerNorm + GELU (GPT-2) or rope + RMSNorm + --swiglu (Llama)")


def hf_config(config: TransformerConfig, args: dict, eod: int, pad: int):
    """The transformers config for our model: same shapes, eps, tying; EOD as BOS/EOS/pad."""
    from transformers import GPT2Config, LlamaConfig

    c = config
    common = dict(vocab_size=c.vocab_size, bos_token_id=eod, eos_token_id=eod, pad_token_id=pad,
                  tie_word_embeddings=not c.untie_embeddings_and_output_weights)
    hidden_dropout, attention_dropout = args.get("hidden_dropout", 0.0), args.get("attention_dropout", 0.0)
    if hf_architecture(c) == "gpt2":
        return GPT2Config(n_positions=c.max_position_embeddings, n_embd=c.hidden_size, n_layer=c.num_layers,
                          n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size,
                          activation_function="gelu_new" if c.openai_gelu else "gelu",
                          layer_norm_epsilon=c.layernorm_epsilon, resid_pdrop=hidden_dropout,
                          embd_pdrop=hidden_dropout, attn_pdrop=attention_dropout,
                          initializer_range=c.init_method_std, **common)
    return LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_query_groups, head_dim=c.head_dim, hidden_act="silu",
                       max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.layernorm_epsilon,
                       rope_theta=float(c.rotary_base), attention_bias=c.add_bias_linear, mlp_bias=c.add_bias_linear,
                       attention_dropout=attention_dropout, initializer_range=c.init_method_std, **common)


@dataclass
class ExportResult:
    architecture: str  # "gpt2" or "llama"
    fp32_diff: Optional[float]  # max |logit difference| of the in-memory fp32 mapping to our model (see _max_diff)
    saved_diff: Optional[float]  # the same for the saved folder loaded back, against our model in its dtype


def _probe_tokens(loaded, seed: int = 0) -> torch.Tensor:
    """A random [2, min(L, 64)] batch of real (unpadded) token ids."""
    s = min(loaded.config.max_position_embeddings, 64)
    return torch.randint(0, loaded.tokenizer.vocab_size, (2, s), generator=torch.Generator().manual_seed(seed))


def _fp32_reference(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Our model on CPU in fp32 with its weights rounded to `dtype` (a copy unless it is that already)."""
    p = next(model.parameters())
    if dtype == torch.float32 and p.dtype == torch.float32 and p.device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu").to(dtype).float().eval()


def export_to_hf(loaded, out_dir: str, dtype: str = "float32", verify: bool = True) -> ExportResult:
    """Write `loaded` (a LoadedGPT) as a transformers folder `out_dir`, atomically.

    Order: the tokenizer conversion (refused if not faithful), the weight mapping checked in memory in
    fp32 against our model (1e-4, see `_max_diff`), the cast to `dtype`, the write into a temporary
    sibling folder, the folder loaded back and checked against our model with its weights rounded to
    `dtype` (1e-4: both run in fp32), and only then the rename to `out_dir`. A failed check leaves nothing behind.
    `verify=False` skips both logit checks (a model too large to hold twice), not the tokenizer check.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2LMHeadModel, LlamaForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.exists(out_dir) and os.listdir(out_dir) and \
            not os.path.exists(os.path.join(out_dir, "megatron_ltd_export.json")):
        raise UserError(f"--output-dir {out_dir} exists and is not an earlier export; pass a new or empty folder")
    config, tokenizer = loaded.config, loaded.tokenizer
    arch = hf_architecture(config)
    tok = tokenizers_object(tokenizer)  # refuses an unfaithful tokenizer before any weight work

    state = {k: v.detach().to("cpu", torch.float32) for k, v in loaded.model.state_dict().items()}
    weights = (gpt2_state_dict if arch == "gpt2" else llama_state_dict)(state, config)
    cfg = hf_config(config, loaded.args, tokenizer.eod, tokenizer.pad)
    model = (GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM)(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing and not unexpected, f"export mapping is incomplete: {missing[:3]} {unexpected[:3]}"
    model.tie_weights()
    model.eval()
    tokens = _probe_tokens(loaded)
    fp32_diff = saved_diff = None
    if verify:
        fp32_diff = _max_diff(_fp32_reference(loaded.model, torch.float32), model, tokens)
        _check(fp32_diff, "the fp32 mapping")
    model.to(DTYPES[dtype])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad,
        suppress_tokens=list(range(tokenizer.vocab_size, config.vocab_size)) or None)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)  # written aside, moved in when checked
    old = None
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tokenizer, tmp, config.max_position_embeddings)
        with open(os.path.join(tmp, "megatron_ltd_export.json"), "w") as f:
            json.dump({"source": loaded.path, "iteration": loaded.iteration, "architecture": arch,
                       "dtype": dtype, "padded_vocab_size": config.vocab_size,
                       "tokenizer_vocab_size": tokenizer.vocab_size}, f, indent=2)
        if verify:
            del model  # the saved copy replaces it
            back = AutoModelForCausalLM.from_pretrained(tmp).float().eval()
            saved_diff = _max_diff(_fp32_reference(loaded.model, DTYPES[dtype]), back, tokens)
            _check(saved_diff, f"the saved {dtype} folder")
        if os.path.isdir(out_dir):  # an earlier export (checked above): moved aside, removed once replaced
            old = tempfile.mkdtemp(prefix=".hf-export-old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "export"))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return ExportResult(arch, fp32_diff, saved_diff)

