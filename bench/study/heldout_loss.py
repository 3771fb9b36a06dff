"""Loss of a checkpoint on the whole held-out text, the same tokens for every run.

    python bench/study/heldout_loss.py --load RUN/checkpoints --data-prefix DATA/corpus_text_document \
        --first-document N_TRAIN [--batch-size 8] [--output out.json]

The trainer's validation loss samples --eval-iters batches of a validation split whose shuffle depends on
the run's length, so runs of different lengths see different held-out samples. This script removes that
noise from the study's verdict: it concatenates documents N_TRAIN.. of the dataset (the held-out chapters
that `make_kjv_corpus.py` put last), cuts the stream into windows of s+1 tokens that overlap by one token
(as Megatron's GPT samples do), and averages the next-token loss over every predicted token, at full length
(no token dropping). Prints, and with --output writes, {"loss", "ppl", "tokens", "iteration"}.
"""

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron.core.datasets.indexed import IndexedDataset  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402


def heldout_windows(prefix: str, first_document: int, seq_length: int) -> torch.Tensor:
    """[n, s+1] token windows covering documents first_document.. end to end."""
    ds = IndexedDataset(prefix)
    if not 0 <= first_document < ds.num_documents:
        raise UserError(f"--first-document {first_document} is outside 0..{ds.num_documents - 1}")
    first_seq = int(ds.document_indices[first_document])
    stream = np.concatenate([ds[i] for i in range(first_seq, len(ds))]).astype(np.int64)
    n = (len(stream) - 1) // seq_length
    starts = np.arange(n) * seq_length
    return torch.from_numpy(np.stack([stream[a:a + seq_length + 1] for a in starts]))  # [n, s+1]


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1]).float()  # [b, s, V]
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + chunk[:, 1:].numel()
    return total / count


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--data-prefix", required=True)
    p.add_argument("--first-document", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    gpt = load_gpt_checkpoint(args.load)
    windows = heldout_windows(args.data_prefix, args.first_document, gpt.config.seq_length)
    loss = heldout_loss(gpt.model, windows, args.batch_size)
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": int(windows[:, 1:].numel()), "iteration": gpt.iteration}
    print(json.dumps(result))
    if args.output:
        with open(args.output + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(args.output + ".tmp", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
