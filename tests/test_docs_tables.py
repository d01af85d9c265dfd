"""Every measured table of the README and docs/ is what its script's results render (benchmarks/tables.py): a table
edited by hand, or results recorded without publishing them, fail here."""

from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402


def test_tables_are_rendered_from_their_results():
    seen = 0
    for doc in tables.DOCUMENTS:
        for name, body in tables.blocks(doc.read_text()):
            assert body == tables.render(name).rstrip("\n") + "\n", f"{doc.name}: table {name} is not its results"
            seen += 1
    assert seen >= 4  # the toy tables: the README's, and docs/TOY.md's three
