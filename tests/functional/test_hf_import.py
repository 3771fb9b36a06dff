"""tools/convert_hf_to_checkpoint.py against `transformers` itself: randomly initialised GPT-2, Llama (GQA,
biases, tied or not) and Mistral models built offline from configs and saved with save_pretrained import
at TP=1 and TP=2 x PP=2 with the same fp32 logits; export -> import -> export gives the same weights;
bad folders are one error line with nothing written; fine-tuning an imported model with random-LTD lowers
its perplexity on held-out text."""

import json
import os
import random
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, PreTrainedTokenizerFast,
)

from megatron.checkpoint.model_args import build_model_from_args  # noqa: E402
from megatron.checkpoint.protocol import load_checkpoint  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import p2p  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_manual_seed  # noqa: E402
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402
from tests.distributed.launcher import run_distributed  # noqa: E402
from tests.functional.gpt_cli import run_inprocess, train_records  # noqa: E402
from tests.scripts import load_script  # noqa: E402

WORDS = "the a cat dog bird fish sat ran slept swam on under near mat log tree pond big small red blue".split()
SEQ = 64  # the tiny models' context
EOT = "<|endoftext|>"
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=SEQ,
            bos_token_id=0, eos_token_id=0)


def sentence(rng):
    """A small grammar a tiny model learns quickly: 'the big cat sat on the red mat .'"""
    det, adj = rng.choice(["the", "a"]), rng.choice(["big", "small", "red", "blue"])
    return (f"{det} {adj} {rng.choice(['cat', 'dog', 'bird', 'fish'])} {rng.choice(['sat', 'ran', 'slept', 'swam'])} "
            f"{rng.choice(['on', 'under', 'near'])} the {rng.choice(['mat', 'log', 'tree', 'pond'])} .")


def document(rng):
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))


def tokenizer(root):
    """A byte-level BPE trained here (offline), saved by transformers as tokenizer.json + config."""
    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([document(rng) for _ in range(200)] + [" ".join(WORDS)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


def hf_models(tok):
    """name -> (randomly initialised transformers model, how to save it)."""
    V = len(tok)
    torch.manual_seed(0)
    return {
        # tied, biases everywhere; the exact GELU
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=SEQ, vocab_size=V,
                                           activation_function="gelu", bos_token_id=0, eos_token_id=0)),
        # GPT-2's own default, the tanh approximation (`gelu_new`, the hub's checkpoints): --openai-gelu
        "gpt2_new": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=SEQ, vocab_size=V,
                                               bos_token_id=0, eos_token_id=0)),
        # GQA (2 key/value heads for 4 query heads), untied, 5 more embedding rows than tokens, rope_theta
        "llama": LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=2,
                                              vocab_size=V + 5, rope_theta=50000.0, rms_norm_eps=1e-5)),
        # linear biases (attention_bias = mlp_bias), tied, multi-head
        "llama_bias": LlamaForCausalLM(LlamaConfig(**TINY, intermediate_size=48, vocab_size=V, attention_bias=True,
                                                   mlp_bias=True, tie_word_embeddings=True)),
        # Mistral: multi-query attention, no sliding window
        "mistral": MistralForCausalLM(MistralConfig(**TINY, intermediate_size=64, num_key_value_heads=1,
                                                    vocab_size=V, sliding_window=None)),
    }


def save_bin_shards(model, out):
    """Like the hub's original GPT-2: pytorch_model.bin shards without the `transformer.` prefix, with the
    causal-mask buffers, and an index."""
    model.save_pretrained(out)
    os.remove(os.path.join(out, "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, SEQ, SEQ))
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, os.path.join(out, file))
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                   "weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{name: transformers folder} of `hf_models`, "llama_bf16", "gpt2_bin", and "tokenizer" (the fast one)."""
    root = tmp_path_factory.mktemp("hf")
    tok = tokenizer(root)
    out = {"tokenizer": tok}
    for name, model in hf_models(tok).items():
        out[name] = str(root / name)
        model.save_pretrained(out[name], max_shard_size="20KB" if name == "llama" else "50GB")  # sharded index
        tok.save_pretrained(out[name])
    assert os.path.isfile(os.path.join(out["llama"], "model.safetensors.index.json"))
    out["llama_bf16"] = str(root / "llama_bf16")  # bf16 weights stay bf16 in the checkpoint
    AutoModelForCausalLM.from_pretrained(out["llama"]).to(torch.bfloat16).save_pretrained(out["llama_bf16"])
    tok.save_pretrained(out["llama_bf16"])
    out["gpt2_bin"] = str(root / "gpt2_bin")
    save_bin_shards(AutoModelForCausalLM.from_pretrained(out["gpt2"]), out["gpt2_bin"])
    tok.save_pretrained(out["gpt2_bin"])
    return out


def convert(argv):
    return run_cli(load_script("tools/convert_hf_to_checkpoint.py").main, argv)


def imported(hf, name, tmp_path, *extra):
    save = str(tmp_path / f"ckpt_{name}")
    assert convert(["--hf-dir", hf[name], "--save", save, *extra]) == 0
    return save


def probe(vocab, seed=1):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))  # [2, s]


def hf_logits(folder, tokens):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).float().eval()(tokens).logits  # [b, s, V_hf]


@pytest.mark.parametrize("name", ["gpt2", "gpt2_new", "llama", "llama_bias", "mistral", "llama_bf16"])
def test_tp1_import_has_transformers_logits_and_tokenizer(hf, tmp_path, capsys, name):
    save = imported(hf, name, tmp_path)
    out = capsys.readouterr().out
    assert "verified: logits match transformers'" in out and "--load " + save in out
    moved = str(tmp_path / "elsewhere" / "ckpt")  # the tokenizer travels with the checkpoint folder
    shutil.move(save, moved)
    gpt = load_gpt_checkpoint(moved)
    tok = hf["tokenizer"]
    assert type(gpt.tokenizer).__name__ == "HuggingFaceTokenizer" and gpt.tokenizer.vocab_size == len(tok)
    assert gpt.args["true_vocab_size"] == len(tok) and gpt.config.vocab_size == 384  # 300 padded to 128s
    assert gpt.iteration == 0
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert {v.dtype for v in load_checkpoint(moved)["model"].values()} == {dtype}
    tokens = probe(len(tok))
    theirs = hf_logits(hf[name], tokens)
    with torch.no_grad():
        ours = gpt.model(tokens)  # [b, s, 384]
    torch.testing.assert_close(ours[..., :theirs.shape[-1]], theirs, atol=1e-4, rtol=0)
    assert not ours[..., theirs.shape[-1]:].any()  # the zero padding rows
    for text in ("the big cat sat on the mat .", "  Blue\nriver, 42!", ""):
        assert gpt.tokenizer.tokenize(text) == tok.encode(text, add_special_tokens=False)


def test_legacy_bin_shards_import_like_safetensors(hf, tmp_path):
    """pytorch_model.bin shards with unprefixed names and mask buffers (the hub's GPT-2) give the same
    checkpoint as the safetensors folder."""
    a = load_checkpoint(imported(hf, "gpt2", tmp_path))
    b = load_checkpoint(imported(hf, "gpt2_bin", tmp_path))
    assert a["args"] == b["args"] and sorted(a["model"]) == sorted(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _pipeline_logits(rank, world, save, tokens, reference):
    """One rank of TP=2 x PP=2: load this rank's file, run its stage, compare the last stage's logits."""
    tp, stage = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model_parallel_manual_seed(0)  # the tensor-parallel RNG streams the attention's dropout (off) forks
    ckpt = load_checkpoint(save, 0, tp, stage)
    args = ckpt["args"]
    assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (2, 2)
    per_stage = args["num_layers"] // 2
    model = build_model_from_args(args, pre_process=stage == 0, post_process=stage == 1,
                                  layer_offset=stage * per_stage, num_local_layers=per_stage,
                                  hidden_dropout=0.0, attention_dropout=0.0)
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()
    with torch.no_grad():
        if stage == 0:
            p2p.send_forward(model(tokens))  # [b, s, h]
            return
        model.set_input_tensor(p2p.recv_forward((*tokens.shape, args["hidden_size"]), torch.float32).detach())
        logits = model(tokens)  # [b, s, V], gathered over the TP ranks
    torch.testing.assert_close(logits[..., :reference.shape[-1]], reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tp2_pp2_import_has_transformers_logits(hf, tmp_path, name):
    save = imported(hf, name, tmp_path, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert sorted(os.listdir(os.path.join(save, "iter_0000000"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    tokens = probe(len(hf["tokenizer"]), seed=2)
    run_distributed(_pipeline_logits, world_size=4, tp=2, pp=2, args=(save, tokens, hf_logits(hf[name], tokens)),
                    hang_after_s=120)
    gpt = load_gpt_checkpoint(save)  # and merged into one process by the reader
    assert gpt.config.vocab_size == 512  # 300 padded to a multiple of 128 x TP 2


@pytest.mark.parametrize("name", ["gpt2", "gpt2_new", "llama"])
def test_export_import_export_round_trips_the_weights(hf, tmp_path, name):
    export = load_script("tools/convert_checkpoint_to_hf.py").main
    first = imported(hf, name, tmp_path)
    assert run_cli(export, ["--load", first, "--output-dir", str(tmp_path / "hf1")]) == 0
    assert convert(["--hf-dir", str(tmp_path / "hf1"), "--save", str(tmp_path / "again")]) == 0
    assert run_cli(export, ["--load", str(tmp_path / "again"), "--output-dir", str(tmp_path / "hf2")]) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf1", "hf2"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ours = [load_checkpoint(p)["model"] for p in (first, str(tmp_path / "again"))]  # and our side too
    assert all(torch.equal(ours[0][k], ours[1][k]) for k in ours[0]) and sorted(ours[0]) == sorted(ours[1])


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(dst)


BAD_CONFIGS = [
    ("gpt2", dict(model_type="bert", architectures=["BertForMaskedLM"]),
     "unsupported Hugging Face architecture 'bert'"),
    ("gpt2", dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
     "unsupported Hugging Face architecture 'gpt_neox'"),
    ("llama", dict(model_type="qwen2"), "biases on q/k/v but not on the other linears"),
    ("gpt2", dict(activation_function="relu"), "activation_function 'relu'"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling (linear"),
    ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "RoPE scaling (llama3"),
    ("mistral", dict(sliding_window=16), "sliding_window 16 < max_position_embeddings 64"),
    ("llama", dict(attention_bias=True), "attention_bias True with mlp_bias False"),
    ("llama", dict(head_dim=16), "head_dim 16 differs"),
    ("llama", dict(vocab_size=200), "the tokenizer in"),  # 300 ids, 200 rows
    ("llama", dict(num_hidden_layers=3), "do not fit its config.json: unexpected model.layers.3."),
    ("gpt2", dict(tie_word_embeddings=False), "do not fit its config.json: missing lm_head.weight"),
]


@pytest.mark.parametrize("name,changes,needle", BAD_CONFIGS, ids=[b[2][:30] for b in BAD_CONFIGS])
def test_bad_config_is_one_line_and_writes_nothing(hf, tmp_path, capsys, name, changes, needle):
    folder = _edit_config(hf[name], tmp_path / "hf", **changes)
    assert convert(["--hf-dir", folder, "--save", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def _no_weights(d):
    os.remove(os.path.join(d, "model.safetensors"))


def _missing_shard(d):
    os.remove(os.path.join(d, "pytorch_model-00002-of-00002.bin"))


def _pickled_code(d):
    os.remove(os.path.join(d, "pytorch_model-00002-of-00002.bin"))
    payload = {"h.0.ln_1.weight": torch.ones(32), "payload": shutil.rmtree}  # a function: code on unpickling
    torch.save(payload, os.path.join(d, "pytorch_model-00002-of-00002.bin"))


def _different_tied_head(d):
    path = os.path.join(d, "model.safetensors")
    weights = load_file(path)
    save_file({**weights, "lm_head.weight": torch.randn_like(weights["transformer.wte.weight"])}, path)


def _no_tokenizer(d):
    os.remove(os.path.join(d, "tokenizer.json"))


BAD_FOLDERS = [
    ("gpt2", _no_weights, [], "holds no weights: none of model.safetensors"),
    ("gpt2_bin", _missing_shard, [], "pytorch_model-00002-of-00002.bin is missing (named by pytorch_model.bin.index"),
    ("gpt2_bin", _pickled_code, [], "holds Python objects that a safe load refuses"),
    ("gpt2", _no_tokenizer, [], "has no tokenizer.json"),
    ("gpt2", _different_tied_head, [], "tie_word_embeddings, but lm_head.weight differs from transformer.wte.weight"),
    ("mistral", lambda d: None, ["--tensor-model-parallel-size", "2"], "tensor-parallel size 2 does not divide the model's 1 query groups"),
    ("gpt2", lambda d: None, ["--pipeline-model-parallel-size", "3"], "pipeline-parallel size 3 does not divide"),
]


@pytest.mark.parametrize("name,damage,flags,needle", BAD_FOLDERS, ids=[b[3][:30] for b in BAD_FOLDERS])
def test_bad_folder_is_one_line_and_writes_nothing(hf, tmp_path, capsys, name, damage, flags, needle):
    folder = str(tmp_path / "hf")
    shutil.copytree(hf[name], folder)
    damage(folder)
    assert convert(["--hf-dir", folder, "--save", str(tmp_path / "ckpt"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_save_folder_is_refused(hf, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    assert convert(["--hf-dir", hf["gpt2"], "--save", str(tmp_path / "ckpt")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "ckpt") == ["keep.txt"]


# ---- fine-tuning ---------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, ids, vocab):
    """Mean next-token cross entropy over `ids` cut into SEQ + 1 windows, over the tokenizer's `vocab` ids
    (not our zero padding rows); `model(tokens)` -> logits."""
    n = (len(ids) - 1) // SEQ
    x = torch.tensor(ids[:n * SEQ + 1])
    tokens, labels = x[:-1].view(n, SEQ), x[1:].view(n, SEQ)  # [n, s] each
    logits = model(tokens).float()[..., :vocab]  # [n, s, vocab]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


def test_finetuning_an_imported_model_lowers_heldout_perplexity(hf, tmp_path):
    save = imported(hf, "gpt2", tmp_path)
    rng = random.Random(5)
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": document(rng)}) + "\n" for _ in range(400)))
    tok_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.join(save, "tokenizer")]
    assert load_script("tools/preprocess_data.py").main(
        ["--input", str(corpus), "--output-prefix", str(tmp_path / "train"), *tok_flags, "--append-eod",
         "--workers", "1", "--no-progress-bar", "--log-interval", "100000"]) == 0

    gpt = load_gpt_checkpoint(save)
    rng = random.Random(99)  # held-out documents: new draws from the grammar, never trained on
    ids = [i for _ in range(40) for i in gpt.tokenizer.tokenize(document(rng)) + [gpt.tokenizer.eod]]
    V = gpt.tokenizer.vocab_size
    before = heldout_loss(gpt.model, ids, V)
    hf_model = AutoModelForCausalLM.from_pretrained(hf["gpt2"]).float().eval()
    assert before == pytest.approx(heldout_loss(lambda t: hf_model(t).logits, ids, V), abs=1e-4)  # the HF model's

    flags = json.loads((tmp_path / "ckpt_gpt2" / "hf_import.json").read_text())["training_flags"]
    log = tmp_path / "log.jsonl"
    argv = flags + ["--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
                    "--train-iters", "40", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
                    "--lr-warmup-iters", "4", "--data-path", str(tmp_path / "train_text_document"),
                    "--split", "98,2,0", "--num-workers", "0", "--eval-iters", "1", "--eval-interval", "1000",
                    "--log-interval", "1", "--log-json", str(log), "--seed", "3", "--save", str(tmp_path / "ft"),
                    "--random-ltd", "--random-ltd-start-seq-length", "16", "--random-ltd-seq-step", "16",
                    "--random-ltd-ramp-iters", "32"]
    assert run_inprocess(argv) == 0
    records = train_records(log)
    assert records[0]["iteration"] == 1 and records[0]["kept_length"] == 16  # a fresh run, tokens dropped
    after = heldout_loss(load_gpt_checkpoint(str(tmp_path / "ft")).model, ids, V)
    assert after < before - 1.0, (before, after)  # perplexity falls by more than e
