"""The recipes: each main runs on tiny settings; resume and interruption are exact; bad
checkpoints give clear errors; the command line builds any rule from the registry; a learned
inner lr (--learn-lr) and ANIL (--anil) are trained, checkpointed and used at meta-test time."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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


# --- learned inner lr (Meta-SGD / MAML++ / one rate) and ANIL --------------------------

TINY_EXACT = [
    "--mode", "train", "--rule", "exact", "--steps", "2", "--meta-steps", "6",
    "--meta-batch", "2", "--eval-every", "3", "--checkpoint-every", "4", "--test-tasks", "4",
    "--test-steps", "3", "--no-progress", "--no-plots",
]  # fmt: skip
LAST = ["4.weight", "4.bias"]  # the sine MLP's last Linear


def initial_mlp(seed: int = 0) -> torch.nn.Module:
    """The network a run with ``--seed seed`` starts from."""
    from recipes.common.env import seed_everything
    from workloads.sine import make_mlp

    seed_everything(seed)
    return make_mlp()


def by_hand_test_curve(model, problem, lr, adapt, steps):
    """Plain GD on each test task, one task at a time: lr float, (K,) or {name: tensor}."""
    from recipes.common.evaluation import mse

    (xs, ys), (xq, yq) = problem.test_support, problem.test_query
    curve = []
    for i in range(xs.shape[0]):
        phi = {k: v.detach().clone() for k, v in model.named_parameters()}
        row = []
        for k in range(steps + 1):
            with torch.no_grad():
                row.append(float(mse(torch.func.functional_call(model, phi, (xq[i],)), yq[i])))
            names = adapt or list(phi)
            leaves = [phi[n].requires_grad_() for n in names]
            loss = mse(torch.func.functional_call(model, phi, (xs[i],)), ys[i])
            grads = torch.autograd.grad(loss, leaves)
            for n, g in zip(names, grads):
                if isinstance(lr, dict):
                    rate = lr[n]
                elif isinstance(lr, torch.Tensor) and lr.dim() == 1:  # per step, then the last
                    rate = lr[min(k, lr.numel() - 1)]
                else:
                    rate = lr
                phi[n] = (phi[n] - rate * g).detach()
        curve.append(row)
    return torch.tensor(curve).mean(0)


@pytest.mark.parametrize(
    "flags",
    [
        ["--learn-lr", "scalar"],
        ["--learn-lr", "per-step"],
        ["--learn-lr", "per-parameter"],
        ["--anil"],
        ["--learn-lr", "per-parameter", "--anil"],
    ],
)
def test_sine_learned_lr_and_anil(tmp_path, flags):
    from recipes.sine.tasks import SineProblem

    result = sine_main([*TINY_EXACT, *flags, "--out", str(tmp_path)])["train"]
    assert result["completed"]
    ckpt = load_checkpoint(tmp_path / "train" / "checkpoint.pt")
    assert ckpt["config"]["learn_lr"] == result["inner"]["learn_lr"]
    init = initial_mlp()
    adapt = LAST if "--anil" in flags else None
    assert result["inner"]["adapt"] == (adapt or "all")
    shapes = {n: p.shape for n, p in init.named_parameters()}
    mode = flags[1] if "--learn-lr" in flags else "off"
    want = {
        "off": {},
        "scalar": {"lr": torch.Size([])},
        "per-step": {"lr": torch.Size([2])},
        "per-parameter": {n: shapes[n] for n in adapt or shapes},
    }[mode]
    rates = ckpt["inner"]
    assert {k: v.shape for k, v in rates.items()} == want
    for rate in rates.values():  # meta-learned: moved away from --inner-lr (0.01)
        assert not torch.allclose(rate, torch.full_like(rate, 0.01))
    logged = read_jsonl(tmp_path / "train" / "metrics.jsonl")[-1]
    assert ("inner/lr_mean" in logged) == (mode != "off")
    # The body is meta-learned in every mode (with --anil: through the inner loop only).
    for name in ("0.weight", "2.weight"):
        assert not torch.equal(ckpt["model"][name], init.state_dict()[name])
    # The meta-test curve adapts with the learned rates and the adapt list.
    model = initial_mlp()
    model.load_state_dict(ckpt["model"])
    problem = SineProblem(shots=10, query_shots=10, test_tasks=4, eval_steps=2, seed=0,
                          device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
    lr = rates.get("lr", rates) if rates else 0.01
    expected = by_hand_test_curve(model, problem, lr, adapt, 3)
    torch.testing.assert_close(torch.tensor(result["test_curve"]["mean"]), expected)
    if mode != "off":  # ... not the fixed step size
        fixed = by_hand_test_curve(model, problem, 0.01, adapt, 3)
        assert not torch.allclose(fixed[1:], expected[1:])


class HardKill(Exception):
    """Stands in for SIGKILL: the run stops mid-way without a checkpoint of its own."""


@pytest.mark.parametrize(
    ("flags", "how"),
    [(["--learn-lr", "per-parameter"], "sigterm"), (["--learn-lr", "per-step", "--anil"], "kill")],
)
def test_sine_learned_lr_resume_is_exact(tmp_path, flags, how):
    argv = [*TINY_EXACT, *flags]
    full = sine_main([*argv, "--out", str(tmp_path / "full")])["train"]

    def stop_at_5(step, record, stop):
        if step == 5:
            if how == "kill":
                raise HardKill  # the last checkpoint on disk is step 4's
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tmp_path / "cut"
    if how == "kill":
        with pytest.raises(HardKill):
            sine_main([*argv, "--out", str(cut)], callbacks=[stop_at_5])
    else:
        assert sine_main([*argv, "--out", str(cut)], callbacks=[stop_at_5])["train"]["interrupted"]
    saved = load_checkpoint(cut / "train" / "checkpoint.pt")
    assert saved["step"] == (4 if how == "kill" else 5)
    final = load_checkpoint(tmp_path / "full" / "train" / "checkpoint.pt")["inner"]
    for k, v in saved["inner"].items():  # a mid-run rate, not the final one
        assert not torch.equal(v, final[k])
    resumed = sine_main([*argv, "--out", str(cut), "--resume"])["train"]
    assert without_times(resumed) == without_times(full)
    metrics = "train/metrics.jsonl"
    assert records(cut / metrics) == records(tmp_path / "full" / metrics)
    done = load_checkpoint(cut / "train" / "checkpoint.pt")
    for k, v in final.items():
        assert torch.equal(done["inner"][k], v)


def test_resume_with_other_inner_options_is_refused(tmp_path):
    argv = [*TINY_EXACT, "--out", str(tmp_path), "--stop-after", "2"]
    sine_main([*argv, "--learn-lr", "per-step"])
    with pytest.raises(ValueError, match=r"other settings[\s\S]*--learn-lr: checkpoint 'per-step'"):
        sine_main([*argv, "--resume", "--learn-lr", "scalar"])
    with pytest.raises(ValueError, match=r"other settings[\s\S]*--anil: checkpoint False"):
        sine_main([*argv, "--resume", "--learn-lr", "per-step", "--anil"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learn-lr", "bogus"], r"argument --learn-lr: invalid choice: 'bogus'"),
        (["--learn-lr", "scalar", "--rule", "reptile"], r"--learn-lr scalar needs a meta-grad"),
        (["--anil", "--rule", "reptile"], r"--anil needs a meta-gradient rule"),
        (["--learn-lr", "per-step", "--rule", "implicit_cg", "--reg", "1"],
         r"--learn-lr per-step with implicit_cg\(reg=1\): ImplicitCG .*learned lr"),
    ],
)  # fmt: skip
def test_bad_inner_options_are_clear_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_config(SineConfig, argv)
    assert re.search(message, capsys.readouterr().err)


def test_inner_options_outside_the_command_line():
    with pytest.raises(ValueError, match="--learn-lr must be one of off, scalar"):
        SineConfig(learn_lr="per-layer")
    assert SineConfig(anil=True, rule="implicit_cg:reg=1").anil  # the IFT gives the body one


def test_sine_seeds_summary(tmp_path, capsys):
    from recipes.sine.seeds import main as seeds_main

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        sine_main([*TINY_EXACT, "--learn-lr", "scalar", "--seed", str(seed), "--out", str(out)])
        runs.append(str(out))
    capsys.readouterr()
    text = seeds_main(["--steps", "0,1,3", f"Meta={','.join(runs)}"])
    curves = [json.loads((Path(r) / "train" / "result.json").read_text()) for r in runs]
    one = [c["test_curve"]["mean"][1] for c in curves]
    mean, std = sum(one) / 2, abs(one[0] - one[1]) / 2**0.5
    assert f"{mean:.3f} ± {std:.3f}" in text and "| Meta   |    0 |" in text
    with pytest.raises(SystemExit):
        seeds_main(["--steps", "7", f"Meta={runs[0]}"])  # no value at 7 steps
