"""The recipes' bad inputs (issue 10, "recipes:"): each is answered at start with a message
naming what is wrong, or refused without touching the run's files."""

from __future__ import annotations

import os
import signal
import stat
import threading

import pytest
import torch

from recipes.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recipes.common.config import parse_config
from recipes.common.interrupt import run_cli
from recipes.common.metrics import write_json
from recipes.common.plotting import plot_curves
from recipes.regression2d.recipe import Regression2DConfig
from recipes.sine import SineConfig
from recipes.sine import main as sine_main

TINY = [
    "--mode", "train", "--rule", "exact", "--steps", "2", "--meta-steps", "4",
    "--meta-batch", "2", "--eval-every", "2", "--test-tasks", "3", "--test-steps", "2",
    "--no-progress", "--no-plots",
]  # fmt: skip
TINY_STUDY = ["--study-steps", "2", "--study-tasks", "2", "--power-iters", "2"]


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (SineConfig, ["--query-shots", "0"], "--query-shots must be >= 1"),
        (SineConfig, ["--shots", "0"], "--shots must be >= 1"),
        (SineConfig, ["--steps", "0"], "--steps must be >= 1"),
        (SineConfig, ["--test-tasks", "0"], "--test-tasks must be >= 1"),
        (SineConfig, ["--power-iters", "0"], "--power-iters must be >= 1"),
        (SineConfig, ["--outer-lr", "inf"], "--outer-lr must be a finite number"),
        (SineConfig, ["--study-lr", "nan"], "--study-lr must be a finite number"),
        (SineConfig, ["--methods", "adjoint:flow=bogus"], "flow=bogus: method='bogus' is not"),
        (SineConfig, ["--methods", "binomial:order=1,order=2"], "'order' given twice"),
        (SineConfig, ["--rule", "binomial:order=1", "--order", "2"], "'order' given twice"),
        (SineConfig, ["--methods", "exact:label=.."], "label='..' names the run's folder"),
        (SineConfig, ["--methods", "exact:label=a/b"], "label='a/b' names the run's folder"),
        (Regression2DConfig, ["--train-tasks", "0"], "--train-tasks must be >= 1"),
        (Regression2DConfig, ["--test-tasks", "0"], "--test-tasks must be >= 1"),
    ],
)
def test_bad_options_are_usage_errors_at_start(cls, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(cls, argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_checkpoint_with_altered_tensor_bytes_is_refused(tmp_path):
    sine_main([*TINY, "--out", str(tmp_path), "--stop-after", "2"])
    ckpt = tmp_path / "train" / "checkpoint.pt"
    weight = load_checkpoint(ckpt)["model"]["0.weight"]
    data = ckpt.read_bytes()
    at = data.index(weight.numpy().tobytes())  # torch's zip stores tensor bytes as they are
    ckpt.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :])
    assert not torch.equal(torch.load(ckpt, weights_only=True)["model"]["0.weight"], weight)
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        sine_main([*TINY, "--out", str(tmp_path), "--resume"])


def test_refused_resume_leaves_config_and_study_untouched(tmp_path):
    sine_main([*TINY, *TINY_STUDY, "--mode", "both", "--out", str(tmp_path), "--stop-after", "2"])
    compared = tmp_path / "cmp"
    sine_main([*TINY, "--methods", "exact", "--out", str(compared), "--stop-after", "2"])
    files = [tmp_path / "config.json", tmp_path / "study" / "study.json"]
    files += [compared / "config.json", compared / "train" / "study.json"]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    with pytest.raises(CheckpointError, match="--outer-lr"):
        sine_main([*TINY, *TINY_STUDY, "--mode", "both", "--out", str(tmp_path), "--resume",
                   "--outer-lr", "0.1"])  # fmt: skip
    with pytest.raises(CheckpointError, match="--outer-lr"):
        sine_main([*TINY, "--methods", "exact", "--out", str(compared), "--resume",
                   "--outer-lr", "0.1"])  # fmt: skip
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before


def test_shape_mismatched_checkpoint_is_a_checkpoint_error(tmp_path):
    sine_main([*TINY, "--out", str(tmp_path), "--stop-after", "2"])
    ckpt = tmp_path / "train" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    state["model"]["0.weight"] = torch.zeros(7, 1)
    save_checkpoint(ckpt, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    with pytest.raises(CheckpointError, match=r"does not fit this run's model[\s\S]*size"):
        sine_main([*TINY, "--out", str(tmp_path), "--resume"])


def test_device_auto_resumes_a_cpu_run_on_a_cpu_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here")
    sine_main([*TINY, "--out", str(tmp_path), "--device", "cpu", "--stop-after", "2"])
    result = sine_main([*TINY, "--out", str(tmp_path), "--device", "auto", "--resume"])
    assert result["train"]["completed"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask_and_stale_temporaries_are_removed(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "c.pt", {"step": 1})
    finally:
        os.umask(old)
    for name in ("a.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    # A run killed mid-write (SIGKILL) leaves its temporary; the next start removes it.
    run = tmp_path / "run"
    sine_main([*TINY, "--out", str(run), "--stop-after", "2"])
    stale = run / "train" / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    sine_main([*TINY, "--out", str(run), "--resume"])
    assert not stale.exists()
    assert not list(run.rglob("*.tmp"))


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    path = tmp_path / "p.png"
    plot_curves(path, {"a": ([0, 1], [1.0, 2.0], None)}, xlabel="x", ylabel="y")
    first = path.read_bytes()

    def torn(self, fname, **kwargs):  # writes half an image, then dies
        fname.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        plot_curves(path, {"b": ([0, 1], [3.0, 2.0], None)}, xlabel="x", ylabel="y")
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_ctrl_c_during_the_sine_study_exits_with_a_message(tmp_path, capsys):
    argv = ["--mode", "study", "--study-tasks", "500", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]  # fmt: skip
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli("python -m recipes.sine", lambda: sine_main(argv), lambda r: False)
    finally:
        timer.cancel()
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "python -m recipes.sine: interrupted" in err and "Traceback" not in err
