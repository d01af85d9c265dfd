"""How many CPU threads a torch run should take, and how OpenMP's threads should wait: the wall time of one
`qstar train` run per setting, on an idle machine and beside a busy process (numpy matmuls on 1 or 2 threads, the
"other job" of a shared laptop or CI runner), each setting's runs one after another in this process.

    python benchmarks/threads.py [--iters 40] [--competitor-threads 1 2] [-- TRAIN FLAGS...]

Settings: 1 thread; every core with OpenMP's threads spinning between parallel regions (OMP_WAIT_POLICY=ACTIVE, what
libgomp does by default); every core with them sleeping (PASSIVE, what qstar sets unless the environment says
otherwise). Flags after `--` go to `qstar train` (default: the shipped model's run, shortened to --iters).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "1 thread": ("1", "PASSIVE"),
    "all cores, spinning": (str(os.cpu_count()), "ACTIVE"),
    "all cores, sleeping": (str(os.cpu_count()), "PASSIVE"),
}
BUSY = "import numpy as np\na = np.random.rand(1024, 1024)\nwhile True:\n    a @ a\n"


def timed_run(threads: str, policy: str, iters: int, flags: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = ["qstar", "train", "--iters", str(iters), "--threads", threads, "--out", out, *flags]
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        tic = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        return time.perf_counter() - tic


def beside(competitor: int | None, threads: str, policy: str, iters: int, flags: list[str]) -> float:
    """The run's wall time, with a busy process of `competitor` threads running meanwhile (None: alone)."""
    if competitor is None:
        return timed_run(threads, policy, iters, flags)
    env = {**os.environ, "OMP_NUM_THREADS": str(competitor), "OPENBLAS_NUM_THREADS": str(competitor)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    try:
        time.sleep(1)
        return timed_run(threads, policy, iters, flags)
    finally:
        busy.kill()
        busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--competitor-threads", type=int, nargs="+", default=[1, 2])
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    competitors: list[int | None] = [None, *args.competitor_threads]
    heads = ["alone", *(f"beside {n}-thread busy" for n in args.competitor_threads)]
    print(f"{os.cpu_count()} cores; qstar train --iters {args.iters} {' '.join(flags)}: wall seconds")
    print(f"{'':22}" + "".join(f"{h:>22}" for h in heads))
    for name, (threads, policy) in SETTINGS.items():
        times = [beside(c, threads, policy, args.iters, flags) for c in competitors]
        print(f"{name:22}" + "".join(f"{t:22.1f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
