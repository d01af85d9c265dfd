"""Every command and Python snippet of the README runs as written, from a fresh copy of the repository's files, in
order (later ones use what earlier ones made), then the commands of its command table (which use what the Quick start
and the adapter example made): the ones that need the Hugging Face Hub fail at once with one clear line, as they do on
a machine without network, and none prints a warning. Installation commands are left out (this environment is
installed) and so is the README's own test command (it runs these tests)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, SHARED

HUB = ("Qwen/Qwen2.5-0.5B", "open-web-math/open-web-math", "--tasks ")
"""Hub ids in the README, and lm-evaluation-harness tasks (whose datasets the harness fetches): their commands need
the network."""
NEEDS_HUB_MADE = ("qwen-qstar",)
"""What the Hub commands would have made: commands using it fail too, saying the path does not exist."""


def needs_hub(code: str) -> bool:
    """A command that needs the network: it names the Hub, or evaluates a task without a local --data file."""
    return any(h in code for h in HUB + NEEDS_HUB_MADE) or (code.startswith("qstar eval") and "--data" not in code)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced code block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"```(\w+)\n(.*?)```", text, re.S)]


def commands(code: str) -> list[str]:
    """The commands of a shell block: continued lines joined, `&&` chains split, comments, pip and pytest left out."""
    joined = code.replace("\\\n", " ")
    parts = [p.strip() for line in joined.splitlines() for p in line.split("&&")]
    return [p for p in parts if p and not p.startswith(("#", "pip ", "pytest"))]


def table_commands(text: str) -> list[str]:
    """The commands of the README's command table (a row's first cell), as a user copies them: a table writes `|` as
    `\\|`."""
    rows = re.findall(r"^\| `((?:qstar|python -m qstar)[^`]*)` \|", text, re.M)
    return [row.replace("\\|", "|") for row in rows]


README = ROOT / "README.md"


def readme_steps() -> list[tuple[str, str]]:
    steps: list[tuple[str, str]] = []
    text = README.read_text()
    for language, code in blocks(text):
        if language == "bash":
            steps += [("bash", c) for c in commands(code)]
        elif language == "python":
            steps.append(("python", code))
    return steps + [("bash", c) for c in table_commands(text)]


def test_the_readme_has_what_a_newcomer_runs():
    kinds = [kind for kind, _ in readme_steps()]
    runnable = [c for k, c in readme_steps() if k == "bash"]
    assert "python" in kinds and any(c == "qstar train" for c in runnable)
    assert any(c.startswith("qstar eval gsm8k --model runs/qstar/model") for c in runnable)
    table = table_commands(README.read_text())
    assert len(table) == 8 and set(table) <= set(runnable)
    assert not any(re.search(r"\[|\b(CKPT|SRC|DST|DIR|FILE|TEXT)\b", c) for c in table), table  # nothing to fill in


def claimed_seconds() -> float:
    """The default run's time as the README states it: `measured: XmYYs`, inside its claim block."""
    claim = re.search(r"<!-- claim:default-run -->(.*?)<!-- /claim:default-run -->", README.read_text(), re.S)
    assert claim is not None, "README.md lost its claim:default-run block"
    measured = re.search(r"measured: (\d+)m(\d\d)s", claim[1])
    assert measured is not None, claim[1]
    return 60 * int(measured[1]) + int(measured[2])


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    """~5 minutes: the default training run is one of them, and it takes the time the README says, within 50% (with
    the threads the README documents: qstar's own choice)."""
    clone = tmp_path / "qstar"
    clone.mkdir()
    for name in ("README.md", "weights", "docs"):  # what the commands read from the repository
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, clone / name)
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED)
    elif os.environ.get("CI") == "true":
        pytest.fail(f"{SHARED} is missing (the README's eval command reads GSM8K from it)")
    else:
        pytest.skip(f"{SHARED} is missing (the README's eval command reads GSM8K from it)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with contextlib.ExitStack() as servers:
        for kind, code in readme_steps():
            run_step(kind, code, clone, env, servers)


def run_step(kind: str, code: str, clone: Path, env: dict[str, str], servers: contextlib.ExitStack) -> None:
    """One README step as a newcomer runs it; `qstar serve` keeps running (for the client snippet after it) until
    the test ends."""
    if kind == "bash" and code.startswith("qstar serve"):
        server = subprocess.Popen(shlex.split(code), cwd=clone, env=env, stderr=subprocess.PIPE, text=True)
        servers.callback(server.wait, 30)
        servers.callback(server.terminate)
        wait_for_server(server, "http://127.0.0.1:8080/health")
        return
    if kind == "python":
        done = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README snippet failed:\n{code}\n{done.stderr[-3000:]}"
        return
    tic = time.perf_counter()
    done = subprocess.run(code, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    if code == "qstar train":
        seconds = time.perf_counter() - tic
        assert 0.5 < seconds / claimed_seconds() < 1.5, f"the default run took {seconds:.0f} s: {output[-1000:]}"
    warned = [line for line in output.splitlines() if line.lower().startswith("warning:") or "Warning: " in line]
    assert not warned, f"{code}\n{output[-2000:]}"
    if needs_hub(code):
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in output, f"{code}\n{output[-2000:]}"
        assert "Hugging Face Hub" in errors[0] or "does not exist" in errors[0], errors[0]
    else:
        assert done.returncode == 0, f"README command failed: {code}\n{output[-3000:]}"


def wait_for_server(server: subprocess.Popen, health: str) -> None:
    for _ in range(600):
        try:
            with urllib.request.urlopen(health, timeout=1):
                return
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"qstar serve exited: {server.stderr.read()[-2000:] if server.stderr else ''}")
            time.sleep(0.1)
    pytest.fail("qstar serve did not answer within 60 s")


def test_every_path_the_readme_names_exists():
    """Files and folders the README names in backquotes or links, relative to the repository (or ../shared)."""
    text = README.read_text()
    named = set(re.findall(r"\]\(((?:docs|benchmarks|qstar|cli|weights|tests)/[^)#\s]+)", text))
    named |= {p for p in re.findall(r"`((?:docs|benchmarks|qstar|cli|weights|tests)/[\w./-]+)`", text)}
    assert named, "the README names no file"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert missing == []
