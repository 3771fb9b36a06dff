"""Entry-point wrapper: a user's mistake becomes one `error:` line and exit code 2, never a traceback."""

import argparse
import sys

from megatron.core.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad-flag errors raise UserError instead of printing a usage block and exiting, so
    `run_cli` (or a tool's own handler) prints them as the same one `error:` line as every other mistake."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --lr must never silently mean --lr-decay-style
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def user_message(exc: BaseException) -> str:
    """The one-line message of a UserError, also when a DataLoader worker wrapped it in its traceback."""
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker process
        tail = [line for line in text.strip().splitlines() if "UserError:" in line]
        if tail:
            return tail[-1].split("UserError:", 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def run_cli(main, argv=None) -> int:
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
