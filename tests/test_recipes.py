"""The recipes: each main runs on tiny settings; resume and interruption are exact; bad
checkpoints give clear errors; the command line builds any rule from the registry."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import torchopt_metagrad as tmg
from recipes.common.checkpoint import load_checkpoint, save_checkpoint
from recipes.common.config import parse_config
from recipes.common.methods import parse_method, task_direction
from recipes.common.metrics import read_jsonl
from recipes.regression2d import main as regression2d_main
from recipes.sine import SineConfig
from recipes.sine import main as sine_main

TINY_SINE_TRAIN = [
    "--mode", "train", "--rule", "binomial", "--order", "1", "--steps", "2",
    "--meta-steps", "6", "--meta-batch", "2", "--eval-every", "2", "--checkpoint-every", "4",
    "--test-tasks", "4", "--test-steps", "3", "--no-progress", "--no-plots",
]  # fmt: skip
TINY_R2D = [
    "--methods", "first_order:steps=3", "reptile:steps=3", "implicit_cg:reg=1,maxiter=2,steps=3",
    "adjoint:steps=3", "exact:steps=2,label=MAML",
    "--meta-steps", "4", "--meta-batch", "2", "--train-tasks", "6", "--shots", "5",
    "--val-shots", "5", "--test-tasks", "4", "--test-query", "10", "--test-steps", "0", "3",
    "--eval-every", "2", "--checkpoint-every", "3", "--no-progress", "--no-plots",
]  # fmt: skip


def without_times(value: Any) -> Any:
    """Drop wall-clock entries (the only thing that may differ between runs)."""
    if isinstance(value, dict):
        return {
            k: without_times(v)
            for k, v in value.items()
            if not (k.endswith("time_s") or k in ("elapsed_s", "interrupted"))
        }
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def records(path: Path) -> list[dict[str, Any]]:
    return without_times(read_jsonl(path))


def test_sine_study_binomial_beats_truncation_at_small_lr(tmp_path):
    result = sine_main(
        ["--mode", "study", "--study-steps", "3", "--study-tasks", "3", "--power-iters", "3",
         "--out", str(tmp_path), "--no-progress"]
    )["study"]  # fmt: skip
    rules = result["rules"]
    for L in (1, 2):
        assert rules[f"Binomial({L})"]["rel_error"] < rules[f"Truncated({L})"]["rel_error"]
    assert rules["FirstOrder"]["rel_error"] > rules["Binomial(1)"]["rel_error"]
    assert rules["Unrolled"]["rel_error"] < 1e-5 and rules["Binomial(3)"]["rel_error"] < 1e-5
    assert 0 < result["regime"]["K_lr_max_H_mean"] <= result["regime"]["K_lr_max_H_max"]
    for name in ("summary.csv", "study.json", "records.jsonl", "error_vs_L.png"):
        assert (tmp_path / "study" / name).is_file()


def test_sine_train_resume_after_stop_is_exact(tmp_path):
    full = sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path / "full")])["train"]
    assert full["completed"] and full["step"] == 6
    part = sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path / "cut"), "--stop-after", "3"])
    assert part["train"]["interrupted"] and part["train"]["step"] == 3
    assert load_checkpoint(tmp_path / "cut" / "train" / "checkpoint.pt")["step"] == 3
    resumed = sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path / "cut"), "--resume"])["train"]
    assert without_times(resumed) == without_times(full)
    metrics = "train/metrics.jsonl"
    assert records(tmp_path / "cut" / metrics) == records(tmp_path / "full" / metrics)


def test_regression2d_resume_after_sigterm_is_exact(tmp_path):
    full = regression2d_main([*TINY_R2D, "--out", str(tmp_path / "full")])
    assert set(full["ranking"]) == {"first_order(steps=3)", "reptile(steps=3)",
                                    "implicit_cg(reg=1,maxiter=2,steps=3)",
                                    "adjoint(steps=3)", "MAML"}  # fmt: skip
    for entry in full["methods"].values():
        assert all(math.isfinite(v) for v in entry["nrmse_mean"])

    calls = []

    def sigterm_in_third_method(step, record, stop):
        calls.append(step)
        if len(calls) == 2 * 4 + 2:  # meta-step 2 of the third method
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tmp_path / "cut"
    part = regression2d_main([*TINY_R2D, "--out", str(cut)], callbacks=[sigterm_in_third_method])
    assert part["interrupted"] and "ranking" not in part  # no table from a partial study
    (third,) = cut.glob("implicit_cg*")
    assert load_checkpoint(third / "checkpoint.pt")["step"] == 2
    assert len(read_jsonl(third / "metrics.jsonl")) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored

    resumed = regression2d_main([*TINY_R2D, "--out", str(cut), "--resume"])
    assert without_times(resumed) == without_times(full)
    for run in (tmp_path / "full").iterdir():
        if run.is_dir():
            assert records(cut / run.name / "metrics.jsonl") == records(run / "metrics.jsonl")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint to resume from at .*checkpoint\.pt"
    ):
        sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path), "--resume"])
    with pytest.raises(FileNotFoundError, match="no study to resume"):
        regression2d_main([*TINY_R2D, "--out", str(tmp_path / "r"), "--resume"])


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path), "--stop-after", "2"])
    ckpt = tmp_path / "train" / "checkpoint.pt"
    ckpt.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    with pytest.raises(ValueError, match=f"checkpoint {ckpt} is corrupted"):
        sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path), "--resume"])
    # A torch file that is not one of ours, and a truncated one.
    torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(ValueError, match="not a recipes checkpoint"):
        load_checkpoint(ckpt)
    save_checkpoint(ckpt, {"recipe": "x"})
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(ckpt)


def test_resume_with_other_settings_is_refused(tmp_path):
    sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path), "--stop-after", "2"])
    with pytest.raises(ValueError, match=r"other settings[\s\S]*--outer-lr"):
        sine_main([*TINY_SINE_TRAIN, "--out", str(tmp_path), "--resume", "--outer-lr", "0.1"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_metrics_file_with_torn_last_line_is_readable(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]


def test_rule_and_knobs_from_the_command_line():
    def rule_of(*argv: str) -> str:
        return parse_config(SineConfig, list(argv)).rule

    assert rule_of("--rule", "binomial", "--order", "2") == "binomial:order=2"
    assert rule_of("--rule", "implicit_cg", "--reg", "1.0", "--maxiter", "10") == (
        "implicit_cg:reg=1,maxiter=10"
    )
    assert rule_of("--rule", "adjoint", "--solver", "heun") == "adjoint:solver=heun"
    assert rule_of("--rule", "binomial:order=3") == "binomial:order=3"
    assert rule_of("--rule", "reptile") == "reptile"
    for name in tmg.available_rules():  # every registered rule is reachable, knobs typed
        required = [
            f"{f.name}=1"
            for f in dataclasses.fields(tmg.rule_class(name))
            if f.init and f.default is dataclasses.MISSING
        ]
        method = parse_method(":".join([name, ",".join(required)]) if required else name)
        assert type(method.build_rule()) is tmg.rule_class(name)
    assert isinstance(parse_method("binomial:order=2").build_rule(), tmg.Binomial)
    for bad in (["--rule", "binomial"], ["--rule", "truncated", "--reg", "1"],
                ["--rule", "nope"], ["--rule", "binomial", "--order", "-1"],
                ["--power-iters", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_config(SineConfig, bad)
    quick = parse_config(SineConfig, ["--quick", "--meta-steps", "7"])
    assert quick.mode == "both" and quick.meta_steps == 7  # explicit options beat the preset


def test_reptile_direction_is_theta_minus_adapted():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1).double()
    params = dict(net.named_parameters())

    def loss_fn(p, batch):
        x, y = batch
        return ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean()

    x = torch.randn(8, 2, dtype=torch.float64)
    task = ((x, x.sum(1, keepdim=True)), (x, x.sum(1, keepdim=True)))
    task_direction(parse_method("reptile"), None, loss_fn, params, task, steps=3, lr=0.1,
                   scale=0.5)  # fmt: skip
    phi = [p.detach().clone().requires_grad_() for p in params.values()]
    for _ in range(3):  # plain gradient descent, by hand
        grads = torch.autograd.grad(loss_fn(dict(zip(params, phi)), task[0]), phi)
        phi = [(v - 0.1 * g).detach().requires_grad_() for v, g in zip(phi, grads)]
    for p, ph in zip(params.values(), phi):
        torch.testing.assert_close(p.grad, 0.5 * (p.detach() - ph.detach()))


def test_methods_use_the_library_rule_grammar():
    for text in ("binomial:order=2", "implicit_cg:reg=1,maxiter=5", "adjoint:solver=heun"):
        method = parse_method(f"{text},steps=3,label=x")
        assert method.build_rule() == tmg.parse_rule(text)
        assert (method.steps, method.label) == (3, "x")
    # one rule, two spellings: equal methods with one canonical spec (tmg.format_rule's)
    assert parse_method("binomial:order=2,vectorize=true") == parse_method("binomial:order=2")
    assert parse_method("implicit_cg:reg=1.0,maxiter=20,steps=4").spec == (
        "implicit_cg:reg=1,steps=4"
    )
    for bad, message in [("binomial:oder=2", r"no knob 'oder'; knobs: order, .*steps, label"),
                         ("reptile:order=1", "'reptile' has no knob 'order'"),
                         ("binomial:order=1,steps=x", "knob 'steps': expected int")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_method(bad)
