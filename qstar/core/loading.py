"""Loading a checkpoint of any kind onto a backend, and converting one into a qstar checkpoint: `qstar.load` and
`qstar.convert`."""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from qstar.core import checkpoint, lora
from qstar.core.backend import Backend, get, gguf_to_hf
from qstar.core.dtypes import check_dtype
from qstar.core.files import remove_orphans
from qstar.core.hub import TOKENIZER_PATTERNS, resolve
from qstar.core.model import QStarModel, default_step_mode
from qstar.core.model_config import read_config
from qstar.core.recipe import Recipe, make_recipe
from qstar.core.thinker import check_step_mode
from qstar.weights import default_preset


def load(
    path: str | Path,
    backend: str | Backend = "auto",
    dtype: str = "float32",
    recipe: str | Recipe | None = None,
    device: str | None = None,
    step_mode: str | None = None,
    adapter_path: str | Path | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """Load a qstar, authors' or plain Hugging Face checkpoint (local directory or hub id), or an adapter directory
    (its base model with the adapter applied).

    `backend`: auto (mlx on Apple silicon when installed, else torch), torch, mlx, or a backend package.
    `recipe`: a preset name or Recipe; None uses the recipe saved in a qstar checkpoint (or adapter), else the
    model's default preset. `step_mode`: one-pass or two-pass (thinker.STEP_MODES); None: the device's default
    (model.default_step_mode).
    `adapter_path`: an adapter (lora/dora) to apply to the model at `path`.
    `recipe_overrides`: recipe field values, e.g. thought_tokens=3.
    """
    chosen = get(backend) if isinstance(backend, str) else backend
    dtype = check_dtype(dtype)
    path, adapter = with_adapter(path, adapter_path)
    local = resolve(path)
    info = checkpoint.inspect(local)
    base = (recorded_recipe(info, adapter) or default_preset(local)) if recipe is None else recipe
    model = chosen.build_model(info, make_recipe(base, **recipe_overrides), dtype, device)
    model.source = str(local.resolve()) if Path(path).is_dir() else str(path)  # a hub id stays one
    if adapter is not None:
        model.load_adapter(adapter)
    model.step_mode = default_step_mode(model.ops) if step_mode is None else check_step_mode(step_mode)
    return model


def with_adapter(path: str | Path, adapter_path: str | Path | None) -> tuple[str | Path, Path | None]:
    """The model to load and the adapter to apply: `path` may itself be an adapter, applied (unless `adapter_path`
    names another) to the base model it records."""
    adapter = None if adapter_path is None else Path(adapter_path)
    if lora.is_adapter(path):
        adapter = adapter or Path(path)
        path = base_model(Path(path), lora.read_adapter_config(Path(path)))
    return path, adapter


def recorded_recipe(info: checkpoint.CheckpointInfo, adapter: Path | None) -> dict[str, Any] | None:
    """The recipe an adapter records, else the one its checkpoint records (qstar's, the authors'), else None."""
    from_adapter = None if adapter is None else (lora.read_adapter_config(adapter).get("qstar") or {}).get("recipe")
    return from_adapter or info.saved_recipe


def saved_recipe(path: str | Path, adapter_path: str | Path | None = None) -> dict[str, Any] | None:
    """The recipe `qstar.load(path, adapter_path=...)` starts from when given none, if the checkpoint (or adapter)
    records one: what `qstar train --recipe auto` starts from."""
    base, adapter = with_adapter(path, adapter_path)
    return recorded_recipe(checkpoint.inspect(resolve(base)), adapter)


def base_model(adapter: Path, meta: dict[str, Any]) -> str:
    """The base model an adapter directory records (qstar writes it; mlx-lm's have none)."""
    base = meta.get("base_model")
    if not isinstance(base, str):
        raise ValueError(
            f"{adapter / lora.CONFIG_FILE} names no base_model: pass --model BASE --adapter-path {adapter}"
        )
    if base.startswith(("/", ".")) and not Path(base).is_dir():
        raise FileNotFoundError(
            f"{adapter} was trained on {base}, which is not there any more: pass --model BASE --adapter-path {adapter}"
        )
    return base


def with_tokenizer(local: Path, tokenizer: str | Path | None, scratch: Path) -> Path:
    """The checkpoint directory with `tokenizer`'s files (a directory or hub id) beside its own files, in `scratch`
    (the source is left as it is); one clear error for a checkpoint that needs a tokenizer and gets none."""
    config, _ = read_config(local)
    has_one = any((local / f).is_file() for f in checkpoint.TOKENIZER_FILES[:3])
    if tokenizer is None:
        if config.model_type == "openelm" and not has_one:
            raise ValueError(
                f"{local} is an OpenELM checkpoint, which ships no tokenizer: pass --tokenizer DIR_OR_HUB_ID (Apple's "
                "models use Llama-2's, e.g. --tokenizer meta-llama/Llama-2-7b-hf)"
            )
        return local
    files = resolve(tokenizer, TOKENIZER_PATTERNS)
    found = [f for f in checkpoint.TOKENIZER_FILES if (files / f).is_file()]
    if not any(f in found for f in checkpoint.TOKENIZER_FILES[:3]):
        raise FileNotFoundError(f"--tokenizer {tokenizer} holds no tokenizer.json, tokenizer.model or vocab.json")
    scratch.mkdir(parents=True)
    for item in local.iterdir():
        if item.name not in checkpoint.TOKENIZER_FILES:
            (scratch / item.name).symlink_to(item.resolve())
    for name in found:
        shutil.copyfile(files / name, scratch / name)
    return scratch


def gguf_source(src: str | Path, gguf_file: str | None) -> tuple[Path, str] | None:
    """(directory, file name) when `src` names a GGUF checkpoint (a .gguf file, or a directory and --gguf-file)."""
    path = Path(src).expanduser()
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path / gguf_file} not found: --gguf-file names a file inside SRC")
        return path, gguf_file
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass an existing .gguf file")
        return path.parent, path.name
    return None


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    recipe: str | None = None,
    backend: str | Backend = "auto",
    gguf_file: str | None = None,
    quantize: tuple[int, int] | None = None,
    tokenizer: str | Path | None = None,
    **recipe_overrides: Any,
) -> QStarModel:
    """Write a qstar checkpoint at `dst` from an HF or authors' checkpoint (local or hub id), a GGUF file (or a
    directory and `gguf_file`), or a qstar one.

    `dtype` None keeps the checkpoint's own dtype where it has one (else float32). `recipe` None keeps the
    checkpoint's own recipe (a qstar or authors' one), else the default preset; `recipe_overrides` change single
    fields. `quantize` (bits, group_size): quantize the base weights (a QLoRA base). `tokenizer`: a directory or hub
    id whose tokenizer the checkpoint takes (OpenELM ships none). Nothing is left at `dst` if anything fails.
    """
    if Path(dst).exists():
        raise FileExistsError(f"{dst} already exists: choose a new output directory or remove it first")
    remove_orphans(Path(dst).parent, lambda message: print(message, file=sys.stderr))  # what killed converts left
    gguf = gguf_source(src, gguf_file)
    scratch_needed = gguf is not None or tokenizer is not None  # a read-only system temp need not stop the rest
    with tempfile.TemporaryDirectory(prefix="qstar-convert-") if scratch_needed else nullcontext("") as scratch:
        local = gguf_to_hf(*gguf, Path(scratch) / "gguf") if gguf else resolve(src)
        local = with_tokenizer(local, tokenizer, Path(scratch) / "source")
        model = load(
            local, backend=backend, dtype=dtype or checkpoint.source_dtype(local), recipe=recipe, **recipe_overrides
        )
        if quantize is not None:
            model.quantize(*quantize)
        model.save(dst)  # its generation_config.json too (checkpoint.save_generation_files)
    return model
