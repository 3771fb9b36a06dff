"""Export mapping on small random models, for the variants the trained fixtures do not cover:
GPT-2 untied without linear biases, Llama tied with biases, a NullTokenizer; and the refusals."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron.core.errors import UserError
from megatron.core.models.gpt import GPTModel
from megatron.core.tokenizer.null import NullTokenizer
from megatron.core.transformer.config import TransformerConfig
from megatron.evaluation.checkpoint_model import LoadedGPT
from megatron.evaluation.hf_export import export_to_hf, hf_architecture
from tests.unit.evaluation import fixtures  # noqa: F401  (offline environment)

GPT2 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False)
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, rotary_base=500)


def random_gpt(seed, **kw):
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
                               hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-6, **kw)
    model = GPTModel(config).eval()
    with torch.no_grad():  # perturb everything, norms and biases included, so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return LoadedGPT(model, NullTokenizer(97), config, {}, 0, "memory")


@pytest.mark.parametrize("arch,kw", [("gpt2", dict(GPT2, untie_embeddings_and_output_weights=True,
                                                   add_bias_linear=False)),
                                     ("llama", dict(LLAMA, add_bias_linear=True))])
def test_export_reproduces_logits(tmp_path, arch, kw):
    gpt = random_gpt(1, **kw)
    assert export_to_hf(gpt, str(tmp_path / "hf")).architecture == arch
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 98, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, gpt.model(tokens), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.encode("5 0 97 12") == [5, 0, 97, 12] and tok.decode([5, 0, 97]) == "5 0 97"
    assert tok.eos_token_id == tok.bos_token_id == 97
    assert hf.generation_config.suppress_tokens == list(range(98, 128))  # padded vocabulary ids
    meta = json.load(open(tmp_path / "hf" / "megatron_ltd_export.json"))
    assert meta["architecture"] == arch and meta["padded_vocab_size"] == 128


@pytest.mark.parametrize("kw", [dict(GPT2, normalization="RMSNorm"), dict(GPT2, swiglu=True),
                                dict(LLAMA, normalization="LayerNorm"), dict(LLAMA, swiglu=False),
                                dict(GPT2, position_embedding_type="none")])
def test_refuses_what_has_no_equivalent(kw):
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=8,
                               ffn_hidden_size=16, **kw)
    with pytest.raises(UserError, match="no Hugging Face architecture matches"):
        hf_architecture(config)


def test_does_not_overwrite_an_unrelated_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        export_to_hf(random_gpt(2, **GPT2), str(tmp_path))
    assert os.listdir(tmp_path) == ["mine.txt"]


@pytest.mark.parametrize("groups, bias", [(1, False), (2, False), (2, True)])
def test_gqa_llama_export_reproduces_logits(tmp_path, groups, bias):
    """Grouped-query attention: q/k/v split out of Megatron's per-group rows, `num_key_value_heads` = G."""
    from transformers import LlamaForCausalLM

    gpt = random_gpt(3, **LLAMA, untie_embeddings_and_output_weights=True, add_bias_linear=bias,
                     num_query_groups=groups)
    assert export_to_hf(gpt, str(tmp_path / "hf")).architecture == "llama"
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.num_key_value_heads == groups and hf.config.num_attention_heads == 4
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (groups * 8, 32)
    tokens = torch.randint(0, 98, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, gpt.model(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw, needle", [
    (dict(GPT2, num_query_groups=2), "GPT-2 has no grouped-query attention"),
    (dict(LLAMA, rotary_percent=0.5), "--rotary-percent 0.5 has no equivalent"),
])
def test_refuses_gqa_for_gpt2_and_partial_rotary(kw, needle):
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=4, vocab_size=8, **kw)
    with pytest.raises(UserError, match=needle):
        hf_architecture(config)
