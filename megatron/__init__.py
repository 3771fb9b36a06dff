"""megatron-ltd: Megatron-style GPT/BERT pretraining with random-LTD as a first-class feature.

Layout of activations in model code: batch-first `[b, s, h]`
(b micro batch, s sequence, h hidden, r kept tokens under random-LTD, nh heads, hd head dim).
`megatron.core` is the library (no argparse, no globals); `megatron.training` turns Megatron's
command-line flags into config dataclasses and runs the loop.
"""

__version__ = "0.1.0"
