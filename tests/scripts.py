"""Import the repository's scripts (tools/*.py, pretrain_*.py) as modules, to call their main(argv)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Registered in sys.modules under its file stem, so multiprocessing can pickle its functions."""
    path = REPO / relative_path
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    return sys.modules[path.stem]
