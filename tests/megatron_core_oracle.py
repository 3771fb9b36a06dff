"""Run NVIDIA's megatron-core as an independent oracle, in a subprocess.

megatron-core ships a top-level `megatron` package that would shadow ours, so it is installed apart
(`bash tools/setup_venv.sh --test` puts it in `.venv/megatron-core-oracle`) and only ever imported by a
child Python whose PYTHONPATH is that folder and whose working directory is outside this repository.
Set MEGATRON_CORE_ORACLE to use another install. A missing oracle fails the test: the byte-compatibility
claims are only as good as this check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def oracle_dir() -> Path:
    path = Path(os.environ.get("MEGATRON_CORE_ORACLE", REPO / ".venv" / "megatron-core-oracle"))
    if not (path / "megatron" / "core" / "datasets" / "indexed_dataset.py").is_file():
        pytest.fail(
            f"megatron-core oracle not found in {path}; run `bash tools/setup_venv.sh --test` "
            "(or point MEGATRON_CORE_ORACLE at a megatron-core 0.16 install)",
            pytrace=False,
        )
    return path


def run_oracle(script: str, cwd: Path, timeout: float = 180) -> dict:
    """Run `script` with megatron-core importable; it must print one JSON object as its last line."""
    cwd = Path(cwd)
    assert REPO not in cwd.resolve().parents and cwd.resolve() != REPO, "run the oracle outside the repo"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(oracle_dir())
    guard = (
        "import megatron.core as _mc, os as _os\n"
        f"assert _os.path.realpath(_mc.__file__).startswith({str(oracle_dir().resolve())!r}), _mc.__file__\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", guard + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"megatron-core oracle failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    assert lines, f"the oracle printed nothing; stderr:\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1])
