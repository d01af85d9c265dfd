"""qstar's backend-agnostic core: the algorithm, the model's computation, data, training loop, evaluation and
checkpoints, written once against the small array interface of `ops.py`. It imports neither torch nor mlx."""
