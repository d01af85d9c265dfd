"""A package of an optional extra that is missing is one line naming the extra that installs it, wherever it is
imported (qstar/core/extras.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import tomllib
from helpers import ROOT

from qstar.core.backend import PACKAGES
from qstar.core.extras import require_extra


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError) as caught:
        require_extra("tensorboardX", "tensorboard", "--tensorboard", "drop --tensorboard")
    assert str(caught.value) == (
        "--tensorboard needs tensorboardX, which is not installed: pip install 'qstar-lm[tensorboard]', or drop "
        "--tensorboard"
    )


def test_a_broken_package_is_named_too(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg.py").write_text("raise ImportError('cannot import name X from Y')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"^qstar serve cannot import brokenpkg \(cannot import name X from Y\): pip"):
        require_extra("brokenpkg", "serve", "qstar serve")


def extras_required() -> set[str]:
    """The extras named by a require_extra call in qstar/ or cli/ (the backends' extras are named as the backends)."""
    named = set(PACKAGES)
    for path in [*(ROOT / "qstar").rglob("*.py"), *(ROOT / "cli").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require_extra":
                extra = node.args[1]
                if isinstance(extra, ast.Constant):
                    named.add(extra.value)
    return named


def test_every_extra_is_named_where_its_packages_are_imported():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} == extras_required()


def test_the_harness_command_without_lm_eval_says_which_extra_installs_it():
    code = "import sys; sys.modules['lm_eval'] = None; from qstar.lm_eval import main; main()"
    args = [sys.executable, "-c", code, "run", "--model", "qstar", "--tasks", "arc_easy"]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [
        "error: evaluating with lm-evaluation-harness needs lm_eval, which is not installed: "
        "pip install 'qstar-lm[eval]'"
    ]
