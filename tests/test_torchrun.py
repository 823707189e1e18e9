"""The recipes under ``torchrun`` (2 CPU processes, gloo) equal one process.

One torchrun launch meta-trains the sine recipe's tiny config with ``Exact``,
``Binomial(2)`` and ``ImplicitCG`` (``--methods``, float64): the meta-parameters equal a
single-process run over the same global meta-batch (5 tasks, shares of 3 and 2). The
2-process checkpoints then resume in one process for one more meta-step and equal the
single-process run extended the same way (itself bit-identical to an uninterrupted run,
tests/test_recipes.py). A rank that raises ends the job with a non-zero exit and
messages naming it, well within the collective timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes.sine import main as sine_main

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["exact", "binomial:order=2", "implicit_cg:reg=10,maxiter=100,tol=1e-10"]
SLUGS = ["exact", "binomial_order_2", "implicit_cg_reg_10_maxiter_100_tol_1e-10"]
TINY = [
    "--mode", "train", "--steps", "3", "--meta-batch", "5", "--eval-every", "2",
    "--test-tasks", "4", "--test-steps", "3", "--dtype", "float64", "--no-progress",
    "--no-plots", "--dist-timeout", "60",
]  # fmt: skip


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def final_params(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    found = {}
    for slug in SLUGS:
        state = torch.load(out / "train" / slug / "checkpoint.pt", weights_only=True)
        found[slug] = {**state["model"], "step": torch.tensor(state["step"])}
    return found


def test_two_processes_equal_one_and_resume_in_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    argv = [*TINY, "--methods", *METHODS, "--meta-steps", "3"]
    done = torchrun("-m", "recipes.sine", *argv, "--out", str(two))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes, meta-batch 5 split [3, 2]" in done.stdout
    assert done.stdout.count(": outputs in ") == 1  # rank 0 alone prints
    sine_main([*argv, "--out", str(one)])
    together, alone = final_params(two), final_params(one)
    for slug in SLUGS:
        assert int(together[slug]["step"]) == 3
        for name, value in alone[slug].items():
            torch.testing.assert_close(together[slug][name], value, rtol=1e-9, atol=1e-12)
    # Resume both in one process for one more meta-step: the 2-process run continues the
    # same run as the 1-process one.
    longer = [*TINY, "--methods", *METHODS, "--meta-steps", "4", "--resume"]
    sine_main([*longer, "--out", str(two)])
    sine_main([*longer, "--out", str(one)])
    together, alone = final_params(two), final_params(one)
    for slug in SLUGS:
        assert int(together[slug]["step"]) == 4
        for name, value in alone[slug].items():
            torch.testing.assert_close(together[slug][name], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["raise"])
def test_a_failing_rank_stops_the_job_and_is_named(tmp_path, mode):
    start = time.monotonic()
    done = torchrun(
        "tests/torchrun_failing_rank.py", mode, *TINY, "--rule", "exact", "--meta-steps", "3",
        "--meta-batch", "2", "--out", str(tmp_path), "--dist-timeout", "30", timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank 1 of 2 failed at meta-step 2: RuntimeError: injected failure" in output
    assert "rank 0 of 2: a collective at meta-step 3 failed" in output
    assert "Root Cause" in output and "rank      : 1" in output  # torchrun's summary
    assert elapsed < 100, elapsed
