"""Turn a local path or a Hugging Face Hub id into a local checkpoint directory."""

from __future__ import annotations

from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "vocab.json"]


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve(name: str | Path) -> Path:
    """A local directory as is; otherwise download `owner/name` from the Hub (weights as safetensors only)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(str(name)):
        raise FileNotFoundError(
            f"{name} does not exist: pass a checkpoint directory or a Hugging Face Hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_PATTERNS))
    except Exception as err:  # network, auth, missing repo: one message that says what to do
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise RuntimeError(
            f"could not download {name} from the Hugging Face Hub ({reason}); "
            "if you are offline, pass a local checkpoint directory instead"
        ) from None
