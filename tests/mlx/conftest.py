"""These tests need the MLX backend: skipped where mlx or mlx-lm is not installed (a failure under CI=true)."""

from helpers import require

require("mlx.core", "mlx_lm")
