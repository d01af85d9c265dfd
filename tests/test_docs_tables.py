"""Every measured table of the README and docs/ is what its script recorded (benchmarks/tables.py): a table edited
by hand, or one whose results file is missing, fails."""

from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402


def test_every_table_is_rendered_from_its_results():
    found = []
    for doc in tables.DOCUMENTS:
        for name, body in tables.blocks(doc.read_text()):
            found.append(name)
            assert (tables.RESULTS / f"{name}.json").is_file(), f"{doc.name}: no benchmarks/results/{name}.json"
            assert body == tables.render(name).rstrip("\n") + "\n", f"{doc.name}: table {name} was edited by hand"
    assert found, "no table blocks: the docs' measured tables are written by benchmarks/ scripts"
