"""Convert a GPT checkpoint into a Hugging Face `transformers` folder (model, config, tokenizer).

    python tools/convert_checkpoint_to_hf.py --load runs/gpt/checkpoints --output-dir hf/gpt-350m
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/gpt-350m')"

Learned positions + LayerNorm + GELU become GPT-2; RoPE + RMSNorm + SwiGLU become Llama; other
combinations have no exact transformers equivalent and are refused (see megatron/evaluation/hf_export.py).
The mapping is checked in fp32 in memory, and the written folder is loaded back and compared with our
model rounded to the saved dtype, before the folder appears under --output-dir; a failed check leaves
nothing (skip both with --no-verify, e.g. for a model that does not fit twice in memory).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (the --save folder) or one iter_XXXXXXX in it")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--output-dir", required=True, help="new folder for the transformers model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights")
    p.add_argument("--no-verify", action="store_true", help="skip the logit checks of the mapping and the folder")
    g = p.add_argument_group("tokenizer files, when they moved since training")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("transformers is not installed; install the eval extra: pip install -e '.[eval]'")
    from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
    from megatron.evaluation.hf_export import export_to_hf, hf_architecture

    overrides = {"vocab_file": args.vocab_file, "merge_file": args.merge_file, "tokenizer_model": args.tokenizer_model}
    gpt = load_gpt_checkpoint(args.load, args.iteration, tokenizer_overrides=overrides)
    hf_architecture(gpt.config)  # refuse before any work
    result = export_to_hf(gpt, args.output_dir, dtype=args.dtype, verify=not args.no_verify)
    if result.fp32_diff is not None:
        print(f"verified: logits match our model to {result.fp32_diff:.1e} (fp32 mapping) and "
              f"{result.saved_diff:.1e} (saved {args.dtype} folder vs our model with {args.dtype} weights)")
    print(f"wrote {args.output_dir}: {result.architecture} architecture, iteration {gpt.iteration} of {gpt.path}, "
          f"{args.dtype} weights, vocab {gpt.config.vocab_size} (tokenizer {gpt.tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
