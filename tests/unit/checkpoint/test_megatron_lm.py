"""megatron_lm.py: what a Megatron-LM file may hold (and what never runs), its args and parameter names as
ours, what is refused, and Megatron's QKV rows being ours. Files come from megatron_lm_files.py."""

import argparse
import os
import pickle
import sys
import types

import pytest
import torch

from megatron.checkpoint import megatron_lm as mlm
from megatron.checkpoint import protocol
from megatron.checkpoint.model_args import transformer_config_from_args
from megatron.core.errors import UserError
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import TransformerConfig
from tests.unit.checkpoint import megatron_lm_files as m

FILE = "iter_0000100/mp_rank_00/model_optim_rng.pt"


@pytest.fixture
def llama_file(tmp_path):
    m.write_megatron_lm(tmp_path / "ck", m.make_weights(m.CONFIGS["llama"]), m.CONFIGS["llama"])
    return tmp_path / "ck" / FILE


# ---- the pickle ------------------------------------------------------------------------------------------
def test_a_megatron_lm_file_loads_with_its_foreign_values_inert(llama_file):
    """Namespace args load as themselves; Megatron's enums, numpy's RNG arrays and TE's BytesIO as inert
    records of their pickled arguments, without importing their modules (not in sys.modules here)."""
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace|Unsupported global"):
        torch.load(llama_file, weights_only=True)  # torch's allowlist alone refuses it
    raw = protocol.torch_load(str(llama_file))
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].num_layers == m.L
    assert raw["args"].params_dtype is torch.float32
    model_type = raw["args"].model_type
    assert isinstance(model_type, mlm.ForeignValue) and model_type.global_name == "megatron.core.enums.ModelType"
    assert model_type.value == 1 and raw["args"].attention_backend.value == 5
    assert not any(name.startswith(("megatron.core.enums", "megatron.core.transformer.enums")) for name in sys.modules)
    np_state = raw["rng_state"][0]["np_rng_state"]
    assert np_state[0] == "MT19937" and isinstance(np_state[1], mlm.ForeignValue)  # the array, never rebuilt
    fp8 = raw["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"]
    assert isinstance(fp8, mlm.ForeignValue) and fp8.global_name == "_io.BytesIO"


class Payload:
    """What an attacker pickles: unpickling calls os.system (a shell command that leaves a marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_payload_is_refused_unrun_beside_megatron_values(tmp_path):
    marker = tmp_path / "payload_ran"
    edit = lambda t, p, payload: setattr(payload["args"], "data_path", Payload(marker))  # noqa: E731
    m.write_megatron_lm(tmp_path / "ck", m.make_weights(m.CONFIGS["gpt2"]), m.CONFIGS["gpt2"], edit=edit)
    with pytest.raises(UserError) as e:
        protocol.torch_load(str(tmp_path / "ck" / FILE))
    assert str(e.value) == (f"refused checkpoint {tmp_path / 'ck' / FILE}: it holds a pickled Python object "
                            "(posix.system), which is never run; checkpoints hold only tensors, plain values and "
                            "(Megatron-LM's) argparse.Namespace args")
    assert not marker.exists()


def test_a_function_under_a_megatron_module_name_never_runs(tmp_path, monkeypatch):
    """Globals under `megatron.` load as inert records: a function pickled under such a name is not called."""
    marker = tmp_path / "function_ran"
    module = types.ModuleType("megatron.fake_tools")

    def touch(path):
        open(path, "w").close()

    touch.__module__, touch.__qualname__ = module.__name__, "touch"
    module.touch = touch
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class Call:
        def __reduce__(self):
            return touch, (str(marker),)

    edit = lambda t, p, payload: payload["rng_state"][0].update(extra=Call())  # noqa: E731
    m.write_megatron_lm(tmp_path / "ck", m.make_weights(m.CONFIGS["gpt2"]), m.CONFIGS["gpt2"], edit=edit)
    monkeypatch.delitem(sys.modules, module.__name__)
    raw = protocol.torch_load(str(tmp_path / "ck" / FILE))
    record = raw["rng_state"][0]["extra"]
    assert record.global_name == "megatron.fake_tools.touch" and record.args == (str(marker),)
    assert not marker.exists()


# ---- args ----------------------------------------------------------------------------------------------
def test_args_as_ours():
    llama = mlm.args_from_megatron(vars(m.namespace(m.CONFIGS["llama"], tp=2, pp=2)))
    assert llama == {
        "num_layers": m.L, "hidden_size": m.H, "num_attention_heads": m.NH, "ffn_hidden_size": 64,
        "group_query_attention": True, "num_query_groups": 2, "position_embedding_type": "rope",
        "normalization": "RMSNorm", "norm_epsilon": 1e-5, "swiglu": True, "openai_gelu": False,
        "disable_bias_linear": True,
        "untie_embeddings_and_output_weights": True, "seq_length": m.S, "max_position_embeddings": m.MAXPOS,
        "rotary_base": 10000, "rotary_percent": 1.0, "init_method_std": 0.02, "hidden_dropout": 0.1,
        "attention_dropout": 0.1, "padded_vocab_size": m.PADDED, "make_vocab_size_divisible_by": 64,
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "tokenizer_type": "NullTokenizer",
        "vocab_size": m.VOCAB, "fp16": False, "bf16": False}
    config = transformer_config_from_args(llama)
    assert (config.num_query_groups, config.add_bias_linear, config.vocab_size) == (2, False, m.PADDED)
    gpt2 = mlm.args_from_megatron(vars(m.namespace(m.CONFIGS["gpt2"])))
    assert gpt2["group_query_attention"] is False and gpt2["num_query_groups"] is None  # Megatron saves 1
    assert (gpt2["position_embedding_type"], gpt2["normalization"], gpt2["disable_bias_linear"]) == (
        "learned_absolute", "LayerNorm", False)
    assert transformer_config_from_args(gpt2).num_query_groups == m.NH
    # Megatron's GELU is tanh-approximated where it fuses the bias (its default) or with --openai-gelu
    assert gpt2["openai_gelu"] is True
    exact = vars(m.namespace(m.CONFIGS["gpt2"], bias_gelu_fusion=False))
    assert mlm.args_from_megatron(exact)["openai_gelu"] is False
    assert mlm.args_from_megatron(dict(exact, openai_gelu=True))["openai_gelu"] is True


def test_older_and_megatron_deepspeed_flag_names():
    base = vars(m.namespace(m.CONFIGS["gpt2"]))
    older = {k: v for k, v in base.items() if k != "layernorm_epsilon"}
    older.update(norm_epsilon=1e-6, use_rotary_position_embeddings=True)  # before --position-embedding-type
    assert mlm.args_from_megatron(older)["norm_epsilon"] == 1e-6
    assert mlm.args_from_megatron(older)["position_embedding_type"] == "rope"
    deepspeed = dict(base, num_key_value_heads=2)  # Megatron-DeepSpeed's GQA flag
    assert mlm.args_from_megatron(deepspeed)["num_query_groups"] == 2
    for value, ours in ((1, "rope"), (2, "learned_absolute")):  # its PositionEmbeddingType enum
        enum_value = mlm._stand_in("megatron.model.enums.PositionEmbeddingType")(value)
        assert mlm.args_from_megatron(dict(base, position_embedding_type=enum_value))["position_embedding_type"] == ours
    alibi = dict(base, position_embedding_type=mlm._stand_in("megatron.model.enums.PositionEmbeddingType")(3))
    assert mlm.lacking(alibi) == ["alibi position embeddings (--position-embedding-type alibi)"]


# ---- refused ---------------------------------------------------------------------------------------------
LACKING = {
    "moe": (dict(num_experts=8), "mixture of experts (--num-experts 8)"),
    "mla": (dict(multi_latent_attention=True), "multi-latent attention (--multi-latent-attention True)"),
    "qk-norm": (dict(qk_layernorm=True), "query/key layernorm (--qk-layernorm True)"),
    "yarn": (dict(position_embedding_type="yarn"), "yarn position embeddings (--position-embedding-type yarn)"),
    "interleaved": (dict(rotary_interleaved=True), "interleaved RoPE (--rotary-interleaved True)"),
    "window": (dict(window_size=(128, 0)), "sliding-window attention (--window-size (128, 0))"),
    "kv-channels": (dict(kv_channels=16), "a head dimension other than hidden/heads (--kv-channels 16)"),
    "1p": (dict(apply_layernorm_1p=True), "zero-centred norm weights (--apply-layernorm-1p True)"),
    "squared-relu": (dict(squared_relu=True), "squared ReLU (--squared-relu True)"),
    "geglu": (dict(gated_linear_unit=True), "a gated linear unit other than SwiGLU (--gated-linear-unit)"),
    "qkv-bias": (dict(add_bias_linear=False, add_qkv_bias=True), "a QKV bias without the other linear biases"),
    "vpp": (dict(num_layers_per_virtual_pipeline_stage=1), "virtual pipeline stages"),
    "uneven-pp": (dict(decoder_first_pipeline_num_layers=1), "uneven pipeline stages"),
    "mtp": (dict(mtp_num_layers=1), "multi-token prediction (--mtp-num-layers 1)"),
}


@pytest.mark.parametrize("case", list(LACKING))
def test_what_we_lack_is_refused_in_one_line(case):
    changes, needle = LACKING[case]
    ckpt = m.rank_payload(m.namespace(m.CONFIGS["gpt2"], **changes), m.te_names(m.make_weights(m.CONFIGS["gpt2"])))
    with pytest.raises(UserError) as e:
        mlm.import_checkpoint(ckpt, "ck/" + FILE)
    text = str(e.value)
    assert text.startswith(f"refused Megatron-LM checkpoint ck/{FILE}: it uses ") and needle in text, text
    assert text.endswith("which this project's GPT does not have") and "\n" not in text


def test_everything_lacking_is_named_at_once_and_old_versions_refused():
    ckpt = m.rank_payload(m.namespace(m.CONFIGS["gpt2"], num_experts=4, qk_layernorm=True), {})
    ckpt.update(checkpoint_version=1.0, model0={}, model1={})
    del ckpt["model"]
    with pytest.raises(UserError) as e:
        mlm.import_checkpoint(ckpt, "x.pt")
    assert str(e.value) == (
        "refused Megatron-LM checkpoint x.pt: it uses mixture of experts (--num-experts 4), query/key layernorm "
        "(--qk-layernorm True), virtual pipeline stages (model0, model1, ...), checkpoint_version 1.0 (before 2.0 "
        "the QKV rows were ordered otherwise; load and re-save it with Megatron-LM first), which this project's "
        "GPT does not have")


def test_a_parameter_without_counterpart_is_refused():
    weights = m.te_names(m.make_weights(m.CONFIGS["llama"]))
    weights["decoder.layers.1.self_attention.q_layernorm.weight"] = torch.ones(8)  # args that do not say so
    with pytest.raises(UserError, match=r"^refused Megatron-LM checkpoint x.pt: parameters "
                                        r"decoder.layers.1.self_attention.q_layernorm.weight have no counterpart"):
        mlm.import_checkpoint(m.rank_payload(m.namespace(m.CONFIGS["llama"]), weights), "x.pt")


# ---- names -----------------------------------------------------------------------------------------------
def test_names_as_ours():
    te = {"decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.3.input_layernorm.weight",
          "decoder.layers.3.self_attention.linear_qkv.layer_norm_bias": "decoder.layers.3.input_layernorm.bias",
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "decoder.layers.0.pre_mlp_layernorm.weight",
          "decoder.layers.0.mlp.linear_fc1.layer_norm_bias": "decoder.layers.0.pre_mlp_layernorm.bias"}
    local = ["decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.bias",
             "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight",
             "embedding.word_embeddings.weight", "output_layer.weight"]
    legacy = {"language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
              "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
              "language_model.encoder.layers.2.input_layernorm.bias": "decoder.layers.2.input_layernorm.bias",
              "language_model.encoder.layers.2.self_attention.query_key_value.weight":
                  "decoder.layers.2.self_attention.linear_qkv.weight",
              "language_model.encoder.layers.2.self_attention.dense.bias":
                  "decoder.layers.2.self_attention.linear_proj.bias",
              "language_model.encoder.layers.2.post_attention_layernorm.weight":
                  "decoder.layers.2.pre_mlp_layernorm.weight",
              "language_model.encoder.layers.2.mlp.dense_h_to_4h.weight": "decoder.layers.2.mlp.linear_fc1.weight",
              "language_model.encoder.layers.2.mlp.dense_4h_to_h.weight": "decoder.layers.2.mlp.linear_fc2.weight",
              "language_model.encoder.final_layernorm.weight": "decoder.final_layernorm.weight",
              "language_model.output_layer.weight": "output_layer.weight",
              "word_embeddings_for_head.weight": "output_layer.weight"}
    for theirs, ours in {**te, **{n: n for n in local}, **legacy}.items():
        assert mlm.our_name(theirs) == ours, theirs


def test_extra_states_dropped_and_the_rest_is_the_weights_bit_for_bit():
    full = m.make_weights(m.CONFIGS["llama"])
    model, dropped = mlm.model_from_megatron(m.te_names(full), "x")
    assert dropped == 5 * m.L and list(model) == list(full)  # qkv, proj, fc1, fc2, core attention
    assert all(torch.equal(model[k], full[k]) for k in full)
    legacy, dropped = mlm.model_from_megatron(m.legacy_names(full), "x")
    assert dropped == 0 and set(legacy) == set(full) and all(torch.equal(legacy[k], full[k]) for k in full)


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_megatron_qkv_rows_are_ours(groups, pos):
    """Megatron's attention (get_query_key_value_tensors: rows viewed as [ng, (np/ng + 2) * hn], split into
    np/ng queries, one key, one value) on our SelfAttention's weights gives our output: nothing is reordered
    on import, at any number of query groups."""
    config = TransformerConfig(num_layers=1, hidden_size=m.H, num_attention_heads=m.NH, seq_length=m.S,
                               vocab_size=8, num_query_groups=groups, position_embedding_type=pos,
                               attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    attn = SelfAttention(config).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 12, m.H)
    sd = {f"layer.self_attention.{k}": v.detach().double() for k, v in attn.state_dict().items()}
    c = dict(m.CONFIGS["gpt2"], pos=pos, groups=groups)
    theirs = m.megatron_attention(x.double(), sd, "layer.", c).float()
    with torch.no_grad():
        ours = attn(x, torch.arange(12).expand(2, 12))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_megatron_lm_formats_other_than_torch_say_how_to_read_them(tmp_path):
    """Megatron-LM's default torch_dist format (no mp_rank_* folders) and its release tracker."""
    from megatron.checkpoint.convert import read_checkpoint

    (tmp_path / "dist/iter_0000100").mkdir(parents=True)
    (tmp_path / "dist/iter_0000100/__0_0.distcp").write_bytes(b"")
    (tmp_path / "dist/iter_0000100/metadata.json").write_text("{}")
    (tmp_path / "dist/latest_checkpointed_iteration.txt").write_text("100")
    hint = "; it is Megatron-LM's torch_dist format: re-save it in the torch format with Megatron-LM"
    with pytest.raises(UserError, match=r"holds no mp_rank_\* folders" + hint):
        read_checkpoint(str(tmp_path / "dist"))
    with pytest.raises(UserError, match=r"model_optim_rng.pt is missing; the checkpoint at .* is incomplete" + hint):
        protocol.load_checkpoint(str(tmp_path / "dist"))
    # with DCP's .metadata and the pickled common.pt, as Megatron-LM writes them: the readers of our own
    # torch_dist format recognise it as Megatron-LM's (not as one of ours missing its common.json)
    from megatron.checkpoint.reader import load_unsharded_checkpoint

    (tmp_path / "dist/iter_0000100/.metadata").write_bytes(b"")
    (tmp_path / "dist/iter_0000100/common.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"iter_0000100 is not a megatron-ltd checkpoint" + hint):
        load_unsharded_checkpoint(str(tmp_path / "dist"))
    (tmp_path / "dist/latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(UserError, match="holds 'release', not an iteration number; a Megatron-LM release checkpoint: "
                                        "rename its release/ folder to iter_0000000"):
        protocol.load_checkpoint(str(tmp_path / "dist"))
