"""pretrain_gpt_ltd.py as a subprocess for the signal tests, slowed down so a signal lands mid-run.

    python tests/reliability/driver.py [pretrain flags]     (RELIABILITY_SLEEP=seconds per micro-batch)

The sleep only stretches time; the numbers are those of the real entry point.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.training.cli import run_cli  # noqa: E402
from tests.scripts import load_script  # noqa: E402


def main() -> int:
    entry = load_script("pretrain_gpt_ltd.py")
    delay, real = float(os.environ.get("RELIABILITY_SLEEP", "0")), entry.forward_step

    def slow_forward_step(data_iterator, model):
        time.sleep(delay)
        return real(data_iterator, model)

    entry.forward_step = slow_forward_step
    return run_cli(entry.main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
