"""The library: models, data, tokenizers, random-LTD. Knows nothing of argparse or the training loop."""
