"""Convert a GPT checkpoint into a Hugging Face `transformers` folder (model, config, tokenizer).

    python tools/convert_checkpoint_to_hf.py --load runs/gpt/checkpoints --output-dir hf/gpt-350m
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/gpt-350m')"

Learned positions + LayerNorm + GELU become GPT-2; RoPE + RMSNorm + SwiGLU become Llama; other
combinations have no exact transformers equivalent and are refused (see megatron/evaluation/hf_export.py).
After writing, the folder is loaded back and its logits compared with ours on a random batch (skip with
--no-verify, e.g. for a model that does not fit twice in memory).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402


def verify(gpt, out_dir: str, seed: int = 0) -> float:
    """Largest |logit difference| between our model and the export on a random [2, min(s, 64)] batch."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out_dir).float().eval()
    s = min(gpt.config.max_position_embeddings, 64)
    tokens = torch.randint(0, gpt.tokenizer.vocab_size, (2, s), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = gpt.model(tokens.to(next(gpt.model.parameters()).device)).float().cpu()  # [2, s, V]
        theirs = hf(tokens).logits.float()  # [2, s, V]
    return (ours - theirs).abs().max().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (the --save folder) or one iter_XXXXXXX in it")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--output-dir", required=True, help="new folder for the transformers model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare logits")
    g = p.add_argument_group("tokenizer files, when they moved since training")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("transformers is not installed; install the eval extra: pip install -e '.[eval]'")
    from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
    from megatron.evaluation.hf_export import export_to_hf, hf_architecture

    overrides = {"vocab_file": args.vocab_file, "merge_file": args.merge_file, "tokenizer_model": args.tokenizer_model}
    gpt = load_gpt_checkpoint(args.load, args.iteration, tokenizer_overrides=overrides)
    hf_architecture(gpt.config)  # refuse before any work
    arch = export_to_hf(gpt, args.output_dir, dtype=args.dtype)
    print(f"wrote {args.output_dir}: {arch} architecture, iteration {gpt.iteration} of {gpt.path}, "
          f"{args.dtype} weights, vocab {gpt.config.vocab_size} (tokenizer {gpt.tokenizer.vocab_size})")
    if not args.no_verify:
        diff = verify(gpt, args.output_dir)
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2
        print(f"verified: max |logit difference| to our model {diff:.2e}")
        if diff > tolerance:
            raise UserError(f"the export's logits differ from ours by {diff:.2e} (> {tolerance}); "
                            f"please report this with the checkpoint's args")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
