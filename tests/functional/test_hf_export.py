"""tools/convert_checkpoint_to_hf.py on trained tiny checkpoints of both architectures: the export's logits
and tokenizer equal ours, and lm-eval's own `hf` backend on the export reports our adapter's metrics."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron.checkpoint.model_args import build_model_from_args
from megatron.checkpoint.protocol import save_checkpoint
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.evaluation.lm_eval_adapter import MegatronGPTLM
from megatron.training.cli import run_cli
from tests.scripts import load_script
from tests.unit.evaluation import fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fixtures.tiny_setup(tmp_path_factory)


def convert(argv):
    return run_cli(load_script("tools/convert_checkpoint_to_hf.py").main, argv)


@pytest.mark.parametrize("arch", sorted(fixtures.ARCHS))
def test_export_matches_our_model_and_adapter(setup, tmp_path, capsys, arch):
    out = str(tmp_path / "hf")
    assert convert(["--load", setup[arch], "--output-dir", out]) == 0
    assert f"{arch} architecture" in capsys.readouterr().out
    gpt = load_gpt_checkpoint(setup[arch])
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, gpt.tokenizer.vocab_size, (2, fixtures.SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, gpt.model(tokens), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("the cat sat on the mat.", "  Blue\nriver, 42!", ""):
        assert tok.encode(text) == gpt.tokenizer.tokenize(text)
        assert tok.decode(tok.encode(text)) == text

    ours = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=4), setup["tasks"])
    theirs = fixtures.evaluate(HFLM(pretrained=out, device="cpu", batch_size=4, dtype="float32"), setup["tasks"])
    assert fixtures.metrics(theirs) == pytest.approx(fixtures.metrics(ours), rel=1e-4)
    generated = {t: [s["resps"] for s in r["samples"]["tiny_gen"]] for t, r in (("ours", ours), ("hf", theirs))}
    assert generated["ours"] == generated["hf"]


def test_torch_dist_checkpoint_exports_and_evaluates_like_the_legacy_one(setup, tmp_path):
    """The same weights in the torch_dist format (tools/checkpoint_util.py --target-ckpt-format torch_dist):
    the export, lm-eval through the registered adapter and our model all give the legacy checkpoint's answers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    dist = str(tmp_path / "dist")
    assert load_script("tools/checkpoint_util.py").main(
        ["--load", setup["gpt2"], "--save", dist, "--target-ckpt-format", "torch_dist"]) == 0
    assert (tmp_path / "dist" / "iter_0000003" / ".metadata").is_file()
    legacy = load_gpt_checkpoint(setup["gpt2"])
    assert convert(["--load", dist, "--output-dir", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, legacy.tokenizer.vocab_size, (2, fixtures.SEQ), generator=g)  # [b, s]
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, legacy.model(tokens), atol=1e-4, rtol=0)
    results = simple_evaluate(model="megatron-gpt", model_args=f"load={dist}", tasks=["tiny_mc"], batch_size="2",
                              task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
                              bootstrap_iters=0)
    direct = fixtures.evaluate(MegatronGPTLM(legacy.model, legacy.tokenizer), setup["tasks"], tasks=["tiny_mc"])
    assert fixtures.metrics(results) == fixtures.metrics(direct)


def test_architecture_without_equivalent_is_refused(setup, tmp_path, capsys):
    args = dict(load_gpt_checkpoint(setup["gpt2"]).args, position_embedding_type="rope")  # rope + LayerNorm
    save_checkpoint(str(tmp_path / "ckpt"), 1, {"args": args, "model": build_model_from_args(args).state_dict()})
    assert convert(["--load", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Hugging Face architecture matches --position-embedding-type rope")
    assert not (tmp_path / "hf").exists()


def test_sentencepiece_checkpoint_exports_with_its_tokenizer(tmp_path_factory, tmp_path, capsys):
    setup = fixtures.sentencepiece_setup(tmp_path_factory)
    out = str(tmp_path / "hf")
    assert convert(["--load", setup["sp_llama"], "--output-dir", out]) == 0
    assert "llama architecture" in capsys.readouterr().out
    gpt = load_gpt_checkpoint(setup["sp_llama"])
    assert type(gpt.tokenizer).__name__ == "SentencePieceTokenizer"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, gpt.tokenizer.vocab_size, (2, fixtures.SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, gpt.model(tokens), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == tok.bos_token_id == gpt.tokenizer.eod
    lines = fixtures.corpus_lines()
    assert len(lines) >= 300
    for text in lines:  # ids equal ours, and decoding gives our text back
        ids = tok.encode(text)
        assert ids == gpt.tokenizer.tokenize(text), text
        assert tok.decode(ids) == gpt.tokenizer.detokenize(ids), text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_equals_our_rounded_model(setup, tmp_path, capsys, dtype):
    out = str(tmp_path / "hf")
    assert convert(["--load", setup["llama"], "--output-dir", out, "--dtype", dtype]) == 0
    assert "verified" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == getattr(torch, dtype)
    gpt = load_gpt_checkpoint(setup["llama"])
    rounded = gpt.model.to(getattr(torch, dtype)).float()  # our weights rounded as the export stores them
    tokens = torch.randint(0, gpt.tokenizer.vocab_size, (2, fixtures.SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf.float()(tokens).logits, rounded(tokens), atol=1e-4, rtol=0)


def test_a_failed_check_leaves_no_folder_and_keeps_an_earlier_export(setup, tmp_path, capsys, monkeypatch):
    import json

    from megatron.evaluation import hf_export

    real = hf_export.llama_state_dict
    monkeypatch.setattr(hf_export, "llama_state_dict", lambda state, config: {  # a wrong mapping: norms off
        k: (v + 1 if k.endswith("norm.weight") else v) for k, v in real(state, config).items()})
    assert convert(["--load", setup["llama"], "--output-dir", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the fp32 mapping gives logits") and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(hf_export, "llama_state_dict", real)
    assert convert(["--load", setup["llama"], "--output-dir", str(tmp_path / "hf")]) == 0  # an earlier export
    def failing(diff, what):  # the check of the saved folder fails, after the fp32 one passed
        if what.startswith("the saved"):
            raise hf_export.UserError("the saved folder's check failed")

    monkeypatch.setattr(hf_export, "_check", failing)
    assert convert(["--load", setup["llama"], "--output-dir", str(tmp_path / "hf"), "--dtype", "float16"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left beside it
    assert json.load(open(tmp_path / "hf" / "megatron_ltd_export.json"))["dtype"] == "float32"
