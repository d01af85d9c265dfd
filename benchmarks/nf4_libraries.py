"""Which library quantizes the torch backend's QLoRA base: bitsandbytes' NF4 against torchao's NF4Tensor (what
torchtune uses), measured side by side in one process on one Linear of a real model's shape: the error of its output
against the float layer, the stored bytes, and the time of a forward and of a forward+backward (the QLoRA step's
work: gradients flow to the input, never to the 4-bit weight).

    pip install bitsandbytes torchao
    python benchmarks/nf4_libraries.py [--in-features 576] [--out-features 1536] [--tokens 256] [--threads 1]

576 x 1536 is SmolLM2-135M's MLP projection.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.out_features, args.in_features) * 0.02
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    reference = (x @ w.T).detach()

    import bitsandbytes as bnb
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    packed = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)._quantize("cpu")
    ao = to_nf4(w, 64, 256)
    ways: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        "float32 Linear": (lambda v: v @ w.T, w.numel() * 4),
        "bitsandbytes NF4": (
            lambda v: bnb.matmul_4bit(v, packed, quant_state=packed.quant_state),
            packed.numel() + sum(t.numel() * t.element_size() for t in packed.quant_state.as_dict(True).values()),
        ),
        "torchao NF4Tensor": (
            lambda v: linear_nf4(v, ao),
            sum(
                t.numel() * t.element_size() for t in (ao.quantized_data, ao.quantized_scalers, ao.quantization_factor)
            ),
        ),
    }
    shape = f"{args.tokens} x {args.in_features} -> {args.out_features}, {args.threads} thread(s)"
    print(f"{shape}: median of {args.repeats}")
    print(f"{'':18}  {'rel. error':>10}  {'bytes':>9}  {'forward':>9}  {'fwd+bwd':>9}")
    for name, (fn, size) in ways.items():
        error = float((fn(x.detach()) - reference).norm() / reference.norm())
        forward = seconds(lambda fn=fn: fn(x.detach()), args.repeats)  # type: ignore[misc]
        both = seconds(lambda fn=fn: fn(x).sum().backward(), args.repeats)  # type: ignore[misc]
        print(f"{name:18}  {error:10.4f}  {size:9d}  {forward * 1e3:7.2f}ms  {both * 1e3:7.2f}ms")


if __name__ == "__main__":
    main()
