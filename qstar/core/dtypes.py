"""The compute dtypes qstar runs in, named once: their canonical names, the short aliases users type, their sizes."""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
"""Each dtype qstar computes in, and the bytes of one element."""
DTYPES = tuple(DTYPE_BYTES)
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
HALF = ("bfloat16", "float16")
"""Half precision: the optimizer keeps float32 master weights beside them."""
CHOICES = f"{', '.join(DTYPES)} (or {', '.join(ALIASES)})"
"""How a help text or an error lists them."""


def check_dtype(dtype: str) -> str:
    """The dtype's canonical name ("bf16" -> "bfloat16"); one clear error for anything else."""
    dtype = ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {CHOICES}")
    return dtype
