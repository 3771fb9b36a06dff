"""docs/RELIABILITY.md's catalog: every row names a test that exists (file and function)."""

import ast
import os
import re

from tests.functional.gpt_cli import REPO

ROW = re.compile(r"^\| (\d+) \|")
REF = re.compile(r"`((?:rel|unit|functional|distributed)/[\w/]+\.py)::(\w+)")


def test_every_catalog_row_names_an_existing_test():
    with open(os.path.join(REPO, "docs/RELIABILITY.md")) as f:
        catalog = f.read().split("\n## Catalog\n")[1].split("\n## ")[0]
    rows = [line for line in catalog.splitlines() if ROW.match(line)]
    assert [int(ROW.match(r).group(1)) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 25
    missing = []
    for row in rows:
        refs = REF.findall(row)
        if not refs:  # "…[case] (same test)": the test of the row above
            assert "…" in row or "same test" in row, row
            continue
        for path, name in refs:
            with open(os.path.join(REPO, "tests", path.replace("rel/", "reliability/", 1))) as f:
                defined = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
            if name not in defined:
                missing.append(f"{path}::{name}")
    assert missing == []
