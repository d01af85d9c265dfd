"""Turn a local path or a Hugging Face Hub id into a local checkpoint directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "vocab.json"]
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.jinja",
    "merges.txt",
    "vocab.json",
]
"""A tokenizer's files alone (qstar convert --tokenizer)."""


HUB_HOST = ("huggingface.co", 443)
PROBE_SECONDS = 3.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (HF_HUB_OFFLINE set, no route to it), or None: one quick probe
    instead of the retries of the hub clients, which take half a minute to give up."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT")
    host = (urlparse(endpoint).hostname or HUB_HOST[0], urlparse(endpoint).port or 443) if endpoint else HUB_HOST
    try:
        socket.create_connection(host, timeout=PROBE_SECONDS).close()
    except OSError as err:
        return f"{host[0]} is unreachable: {err.strerror or type(err).__name__}"
    return None


def require_hub(what: str, instead: str) -> None:
    """Fail at once, saying what to do, when the Hub cannot be reached for `what`."""
    reason = hub_unreachable()
    if reason is not None:
        raise RuntimeError(f"cannot {what} from the Hugging Face Hub ({reason}): {instead}")


def looks_like_hub_id(name: str) -> bool:
    """owner/name, where `owner` is no directory here (`runs/model` with a `runs/` beside it is a local path)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(parts[0]).is_dir()


def resolve(name: str | Path, patterns: list[str] = HUB_PATTERNS) -> Path:
    """A local directory as is; otherwise download `owner/name` from the Hub (its files matching `patterns`: by
    default the model, weights as safetensors only)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(str(name)):
        raise FileNotFoundError(
            f"{name} does not exist: pass a checkpoint directory or a Hugging Face Hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    require_hub(f"download {name}", "pass a local checkpoint directory instead")
    try:
        return Path(snapshot_download(str(name), allow_patterns=patterns))
    except Exception as err:  # network, auth, missing repo: one message that says what to do
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise RuntimeError(
            f"could not download {name} from the Hugging Face Hub ({reason}); "
            "if you are offline, pass a local checkpoint directory instead"
        ) from None
