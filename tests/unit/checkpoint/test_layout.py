"""layout (and convert's vocabulary re-padding): shards match slicing written out here, merge(split(x)) == x
bit for bit, each parameter's split read off the model, bad layouts."""

import pytest
import torch

from megatron.checkpoint import convert
from megatron.checkpoint import layout as cl
from megatron.checkpoint.tokenizer import tokenizer_vocab_size
from megatron.core.errors import UserError
from megatron.core.tensor_parallel.sharding import merge_shards, shard_tensor

L, H, NH, V, MAXPOS = 4, 64, 8, 128, 32
LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 2)]
CONFIGS = {
    "gelu-bias-layernorm-tied": dict(swiglu=False, bias=True, rms=False, untie=False, pos=True, ffn=None),
    "swiglu-nobias-rmsnorm-untied": dict(swiglu=True, bias=False, rms=True, untie=True, pos=False, ffn=192),
    "swiglu-bias-layernorm-tied-default-ffn": dict(swiglu=True, bias=True, rms=False, untie=False, pos=True, ffn=None),
    "gelu-nobias-rmsnorm-untied": dict(swiglu=False, bias=False, rms=True, untie=True, pos=True, ffn=128),
}


def make_args(c, vocab=V, layers=L):
    return {"num_layers": layers, "hidden_size": H, "num_attention_heads": NH, "ffn_hidden_size": c["ffn"],
            "swiglu": c["swiglu"], "untie_embeddings_and_output_weights": c["untie"], "padded_vocab_size": vocab,
            "max_position_embeddings": MAXPOS, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "normalization": "RMSNorm" if c["rms"] else "LayerNorm", "disable_bias_linear": not c["bias"],
            "position_embedding_type": "learned_absolute" if c["pos"] else "rope"}


def ffn_size(c):
    if c["ffn"] is not None:
        return c["ffn"]
    return int(4 * H * 2 / 3 / 64) * 64 if c["swiglu"] else 4 * H


def make_model(c, vocab=V, layers=L, seed=0):
    """An unsharded state dict with distinct random values everywhere."""
    g = torch.Generator().manual_seed(seed)
    f = ffn_size(c)
    f1 = 2 * f if c["swiglu"] else f
    sd = {"embedding.word_embeddings.weight": torch.randn(vocab, H, generator=g)}
    if c["pos"]:
        sd["embedding.position_embeddings.weight"] = torch.randn(MAXPOS, H, generator=g)

    def norm(name):
        sd[name + ".weight"] = torch.randn(H, generator=g)
        if not c["rms"]:
            sd[name + ".bias"] = torch.randn(H, generator=g)

    def linear(name, out, inp):
        sd[name + ".weight"] = torch.randn(out, inp, generator=g)
        if c["bias"]:
            sd[name + ".bias"] = torch.randn(out, generator=g)

    for i in range(layers):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.linear_qkv", 3 * H, H)
        linear(p + "self_attention.linear_proj", H, H)
        norm(p + "pre_mlp_layernorm")
        linear(p + "mlp.linear_fc1", f1, H)
        linear(p + "mlp.linear_fc2", H, f)
    norm("decoder.final_layernorm")
    if c["untie"]:
        sd["output_layer.weight"] = torch.randn(vocab, H, generator=g)
    return sd


def rows(t, r, n):
    """Rank r's block of n equal blocks of rows."""
    k = t.shape[0] // n
    return t[r * k:(r + 1) * k]


def cols(t, r, n):
    k = t.shape[1] // n
    return t[:, r * k:(r + 1) * k]


def expected_shard(full, c, key, r, tp):
    """Independent statement of the layout: which slice of the unsharded tensor TP rank r holds."""
    x = full[key]
    f = ffn_size(c)
    if key.endswith("linear_qkv.weight"):  # rows grouped [heads, 3, head_dim]: rank r holds whole heads
        per = NH // tp
        return x.view(NH, 3, H // NH, H)[r * per:(r + 1) * per].reshape(-1, H)
    if key.endswith("linear_qkv.bias"):
        return rows(x, r, tp)
    if key.endswith("linear_fc1.weight") or key.endswith("linear_fc1.bias"):
        if c["swiglu"]:
            gate, up = x[:f], x[f:]
            return torch.cat([rows(gate, r, tp), rows(up, r, tp)])
        return rows(x, r, tp)
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return cols(x, r, tp)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return rows(x, r, tp)
    return x  # norms, position embeddings, row-parallel biases


def expected_stage_keys(full, c, p, pp):
    """{local key: global key} of stage p."""
    per = L // pp
    out = {}
    for key in full:
        if key.startswith("decoder.layers."):
            i = int(key.split(".")[2])
            if p * per <= i < (p + 1) * per:
                out[key.replace(f"decoder.layers.{i}.", f"decoder.layers.{i - p * per}.", 1)] = key
        elif key.startswith("embedding."):
            if p == 0:
                out[key] = key
        elif p == pp - 1:  # final norm, untied output layer
            out[key] = key
    if p == pp - 1 and pp > 1 and not c["untie"]:
        out["output_layer.weight"] = "embedding.word_embeddings.weight"
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"tp{x[0]}pp{x[1]}")
@pytest.mark.parametrize("name", CONFIGS)
def test_split_matches_slicing_and_merge_is_exact(name, layout):
    c, (tp, pp) = CONFIGS[name], layout
    args = make_args(c)
    full = make_model(c)
    shards = cl.split_model(full, args, tp, pp)
    assert set(shards) == {(t, p) for t in range(tp) for p in range(pp)}
    for (t, p), sd in shards.items():
        want_keys = expected_stage_keys(full, c, p, pp)
        assert set(sd) == set(want_keys), (t, p)
        for local, key in want_keys.items():
            want = expected_shard(full, c, key, t, tp)
            assert sd[local].shape == want.shape and torch.equal(sd[local], want), (t, p, local)
            assert sd[local].is_contiguous() and sd[local].untyped_storage().nbytes() == want.numel() * 4, local
    merged = cl.merge_model(shards, args, tp, pp)
    assert list(merged) == list(full)  # canonical order, no tied copy
    for key in full:
        assert torch.equal(merged[key], full[key]), key


def test_pp1_tied_has_no_output_layer_and_untied_keeps_it():
    for name, c in CONFIGS.items():
        shards = cl.split_model(make_model(c), make_args(c), 2, 1)
        assert ("output_layer.weight" in shards[(1, 0)]) == c["untie"], name


def test_relayout_through_merge_equals_direct_split():
    c = CONFIGS["swiglu-bias-layernorm-tied-default-ffn"]
    full, args = make_model(c), make_args(c)
    via = cl.split_model(cl.merge_model(cl.split_model(full, args, 2, 2), args, 2, 2), args, 4, 1)
    direct = cl.split_model(full, args, 4, 1)
    for rank in direct:
        assert all(torch.equal(via[rank][k], direct[rank][k]) for k in direct[rank])


def test_stride_two_helpers_by_hand():
    full = torch.arange(8)  # [gate 0..3; up 4..7]
    assert shard_tensor(full, 0, 2, 0, 2).tolist() == [0, 1, 4, 5]
    assert shard_tensor(full, 0, 2, 1, 2).tolist() == [2, 3, 6, 7]
    assert merge_shards([torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])], 0, 2).tolist() == list(range(8))
    m = torch.arange(12).view(2, 6)
    assert shard_tensor(m, 1, 1, 2, 3).tolist() == [[4, 5], [10, 11]]


def test_partition_spec_read_off_the_model():
    """No table: the split of every parameter is the tag its layer puts on it."""
    swiglu = cl.ModelLayout(make_args(CONFIGS["swiglu-bias-layernorm-tied-default-ffn"], layers=18))
    gelu = cl.ModelLayout(make_args(CONFIGS["gelu-bias-layernorm-tied"]))
    assert swiglu.spec("decoder.layers.17.mlp.linear_fc1.weight") == (0, 2)
    assert gelu.spec("decoder.layers.0.mlp.linear_fc1.bias") == (0, 1)
    assert gelu.spec("decoder.layers.3.self_attention.linear_proj.weight") == (1, 1)
    assert gelu.spec("decoder.layers.3.self_attention.linear_proj.bias") is None
    assert gelu.spec("embedding.position_embeddings.weight") is None
    with pytest.raises(UserError, match="unknown parameter"):
        gelu.spec("decoder.layers.0.mlp.router.weight")
    rope = cl.ModelLayout(make_args(CONFIGS["swiglu-nobias-rmsnorm-untied"]))  # rope, no biases, RMSNorm
    assert "embedding.position_embeddings.weight" not in rope.specs and rope.spec("output_layer.weight") == (0, 1)
    assert not any(k.endswith(".bias") for k in rope.specs)


def test_model_shape_default_ffn():
    """The FFN size the args leave out is the model's own default (TransformerConfig), not a copy of it."""
    gelu = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    assert cl.ModelLayout(gelu, vocab_rows=V).config.ffn_hidden_size == 256
    swiglu = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": None, "swiglu": True}
    assert cl.ModelLayout(swiglu, vocab_rows=V).config.ffn_hidden_size == 128  # int(4*64*2/3/64)*64
    assert cl.ModelLayout(swiglu, vocab_rows=V).shapes["decoder.layers.1.mlp.linear_fc1.weight"] == (256, 64)
    with pytest.raises(UserError, match="hidden_size"):
        cl.ModelLayout({"num_layers": 2, "num_attention_heads": 4}, vocab_rows=V)


@pytest.mark.parametrize("tp, pp, vocab, needle", [
    (3, 1, V, "8 attention heads"),
    (1, 3, V, "4 layers"),
    (8, 1, 132, "132 padded vocabulary"),
    (0, 1, V, ">= 1"),
])
def test_target_sizes_that_do_not_divide(tp, pp, vocab, needle):
    c = CONFIGS["gelu-bias-layernorm-tied"]
    with pytest.raises(UserError, match=needle):
        cl.split_model(make_model(c, vocab=vocab), make_args(c, vocab=vocab), tp, pp)


def test_ffn_not_divisible():
    c = dict(CONFIGS["swiglu-nobias-rmsnorm-untied"], ffn=100)  # 8 heads split 8 ways, 100 units do not
    with pytest.raises(UserError, match="100 FFN units"):
        cl.split_model(make_model(c), make_args(c), 8, 1)


def test_merge_rejects_bad_shards():
    c = CONFIGS["gelu-bias-layernorm-tied"]
    args = make_args(c)
    good = cl.split_model(make_model(c), args, 2, 2)

    def broken(edit):
        shards = {r: dict(sd) for r, sd in good.items()}
        edit(shards)
        return shards

    key = "decoder.layers.0.mlp.linear_fc2.weight"
    with pytest.raises(UserError, match="mismatched shapes"):
        cl.merge_model(broken(lambda s: s[(1, 0)].__setitem__(key, torch.zeros(H, 7))), args, 2, 2)
    with pytest.raises(UserError, match="different parameters"):
        cl.merge_model(broken(lambda s: s[(1, 1)].pop(key)), args, 2, 2)
    with pytest.raises(UserError, match="unknown parameter"):
        cl.merge_model(broken(lambda s: [sd.__setitem__("decoder.layers.0.extra.weight", torch.zeros(1))
                                         for r, sd in s.items() if r[1] == 0]), args, 2, 2)
    with pytest.raises(UserError, match="has 2 layers"):
        cl.merge_model(broken(lambda s: [sd.__setitem__("decoder.layers.2.mlp.linear_fc2.bias", torch.zeros(H))
                                         for r, sd in s.items() if r[1] == 1]), args, 2, 2)
    with pytest.raises(UserError, match=r"missing \['decoder.layers.1.self_attention.linear_qkv.bias'\]"):
        cl.merge_model(broken(lambda s: [sd.pop("decoder.layers.1.self_attention.linear_qkv.bias")
                                         for r, sd in s.items() if r[1] == 0]), args, 2, 2)
    with pytest.raises(UserError, match=r"shape \[128, 64\], but the args ask for \[256, 64\]"):
        cl.merge_model(good, make_args(c, vocab=256), 2, 2)


def test_repad_vocab_trims_or_zero_extends_padding_rows_only():
    c = CONFIGS["gelu-nobias-rmsnorm-untied"]
    ckpt = {"args": make_args(c), "model": make_model(c)}
    grown = convert.repad_vocab(ckpt, 256, true_vocab=98)
    assert grown["args"]["padded_vocab_size"] == 256 and ckpt["args"]["padded_vocab_size"] == V
    for key in convert.VOCAB_KEYS:
        assert torch.equal(grown["model"][key][:V], ckpt["model"][key])
        assert not grown["model"][key][V:].any()
    shrunk = convert.repad_vocab(grown, 128, true_vocab=98)
    assert all(torch.equal(shrunk["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    with pytest.raises(UserError, match="the tokenizer has 300 ids"):
        convert.repad_vocab(ckpt, 384, true_vocab=300)


def test_tokenizer_vocab_size_from_saved_flags():
    assert tokenizer_vocab_size({"tokenizer_type": "NullTokenizer", "vocab_size": 97}) == 98  # + EOD
    assert tokenizer_vocab_size({}) is None
    missing = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/nope/vocab.json", "merge_file": "/nope/m.txt"}
    assert tokenizer_vocab_size(missing) is None
