"""Convert a local Hugging Face `transformers` folder (GPT-2, Llama, Mistral) into our checkpoint.

    python tools/convert_hf_to_checkpoint.py --hf-dir hf/gpt2 --save ckpt/gpt2 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    # prints the flags that fine-tune it: pretrain_gpt_ltd.py <those flags> --seq-length ... --data-path ...

Reads config.json, the weights (model.safetensors or pytorch_model.bin, or their sharded index; a .bin
is read with weights_only, so nothing in it runs) and tokenizer.json; nothing is downloaded. The
checkpoint (iteration 0) carries the tokenizer in `<save>/tokenizer/`, so evaluation and export need no
tokenizer flags. Before anything is written, transformers' model of the folder and ours are compared in
fp32 (skip with --no-verify, e.g. for a model that does not fit twice in memory); a refused or failed
import leaves no --save folder. What maps and what is refused: megatron/evaluation/hf_import.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="local transformers folder (config.json, weights, tokenizer.json)")
    p.add_argument("--save", required=True, help="new (or empty) folder for the checkpoint")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="the padded vocabulary is a multiple of this x TP, as the trainer pads (same default)")
    p.add_argument("--no-verify", action="store_true", help="skip the fp32 logit check against transformers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core.errors import UserError
    from megatron.evaluation.hf_import import import_from_hf

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise UserError(f"--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1, got {tp}, {pp}")
    r = import_from_hf(args.hf_dir, args.save, tp, pp, args.make_vocab_size_divisible_by, verify=not args.no_verify)
    a = r.args
    if r.logit_diff is not None:
        print(f"verified: logits match transformers' to {r.logit_diff:.1e} (fp32)")
    print(f"wrote {args.save}: {r.model_type} as {r.architecture} layout, {a['num_layers']} layers, hidden "
          f"{a['hidden_size']}, TP={tp} PP={pp}, iteration 0; vocab {a['padded_vocab_size']} rows (tokenizer "
          f"{a['true_vocab_size']}, HF {r.hf_vocab_rows})")
    print(f"fine-tune it with pretrain_gpt_ltd.py, these flags, --seq-length (at most "
          f"{a['max_position_embeddings']}), data and schedule flags:\n  {' '.join(r.training_flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
