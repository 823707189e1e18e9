"""Meta-training throughput (tasks per second) of a recipe under torchrun, 1 vs N processes.

    python benchmarks/bench_torchrun.py                      # sine, Exact, K=5, 1 and 2 processes
    python benchmarks/bench_torchrun.py --procs 1 2 4 --meta-batch 32 --rule binomial:order=2

Each configuration is a real ``torchrun --standalone --nproc_per_node=N -m recipes.sine``
launch (gloo on CPU, nccl on GPUs); its ``metrics.jsonl`` gives every meta-step's time on
rank 0 (adaptation of the rank's share, the all-reduce, the outer step, the metrics
gather). Throughput is the global meta-batch over the median step time, after
``--warmup`` steps. The launches are interleaved (1, 2, 1, 2, ...) ``--repeats`` times and
the best median is kept, as the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def launch(procs: int, args: argparse.Namespace, out: Path) -> float:
    """Median seconds per meta-step of one launch."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={procs}", "-m", "recipes.sine", "--mode", "train",
        "--methods", args.rule, "--steps", str(args.steps), "--meta-batch", str(args.meta_batch),
        "--meta-steps", str(args.meta_steps), "--eval-every", "0", "--test-tasks", "4",
        "--test-steps", str(args.steps), "--no-progress", "--no-plots", "--device", args.device,
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"launch failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    (metrics,) = out.glob("train/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    times = [r["step_time_s"] for r in records[args.warmup :]]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rule", default="exact")
    parser.add_argument("--steps", type=int, default=5, help="inner steps K")
    parser.add_argument("--meta-batch", type=int, default=20, help="global meta-batch")
    parser.add_argument("--meta-steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for procs in args.procs:
                seconds = launch(procs, args, Path(tmp) / f"{procs}-{repeat}")
                best[procs] = min(best.get(procs, float("inf")), seconds)
    print(
        f"sine recipe, {args.rule}, K={args.steps}, global meta-batch {args.meta_batch}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs visible; median of meta-steps "
        f"{args.warmup + 1}..{args.meta_steps}, best of {args.repeats} interleaved launches\n"
    )
    print("| processes | s / meta-step | tasks / s | speed-up |")
    print("|--:|--:|--:|--:|")
    base = best[args.procs[0]]
    for procs in args.procs:
        rate = args.meta_batch / best[procs]
        print(f"| {procs} | {best[procs]:.3f} | {rate:.1f} | {base / best[procs]:.2f}x |")


if __name__ == "__main__":
    main()
