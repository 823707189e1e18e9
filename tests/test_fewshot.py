"""The few-shot recipe: every loader on tiny data made here (same code paths as the real
data), episodes (N distinct classes, K + Q images each, labels 0..N-1, disjoint splits,
same seed same episodes), the glyph set, an end-to-end comparison, resume, vmap over tasks,
and the runner's outer schedule and inner optimizer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.common.checkpoint import load_checkpoint
from recipes.common.config import TrainConfig
from recipes.common.inner import make_inner_optimizer
from recipes.common.metrics import read_jsonl
from recipes.common.outer import outer_lr_at
from recipes.common.runner import RunExistsError
from recipes.fewshot import main as fewshot_main
from recipes.fewshot.datasets import DataSpec, load_splits
from recipes.fewshot.episodes import ClassPool, sample_episode
from recipes.fewshot.glyphs import find_fonts, load_glyphs


def _png(path: Path, rng: np.random.Generator, size: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    """Omniglot's release layout: 15 characters in 3 alphabets, 4 drawings each."""
    root = tmp_path_factory.mktemp("omniglot")
    rng = np.random.default_rng(0)
    layout = (("images_background", ("Alpha", "Beta")), ("images_evaluation", ("Gamma",)))
    for part, alphabets in layout:
        for a in alphabets:
            for c in range(1, 6):
                for d in range(1, 5):
                    _png(root / part / a / f"character{c:02d}" / f"{c:04d}_{d:02d}.png", rng, 20)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """mini/tieredImageNet's layout: class folders under train/val/test."""
    root = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(n):
            for i in range(5):
                _png(root / split / f"n{split}{c:03d}" / f"{i}.jpg", rng, 24, "RGB")
    return root


def check_episodes(pool: ClassPool, ways: int, shots: int, query: int, channels: int, size: int):
    gen = torch.Generator().manual_seed(3)
    (xs, ys), (xq, yq) = sample_episode(pool, gen, ways=ways, shots=shots, query=query)
    assert xs.shape == (ways * shots, channels, size, size) and xs.dtype == torch.float32
    assert xq.shape == (ways * query, channels, size, size)
    assert ys.tolist() == [c for c in range(ways) for _ in range(shots)]
    assert yq.tolist() == [c for c in range(ways) for _ in range(query)]
    # the N classes are distinct: support images of different labels come from different classes
    assert len({xs[ys == c].sum().item() for c in range(ways)}) == ways
    again = sample_episode(
        pool, torch.Generator().manual_seed(3), ways=ways, shots=shots, query=query
    )
    assert torch.equal(again[0][0], xs) and torch.equal(again[1][0], xq)
    other = sample_episode(
        pool, torch.Generator().manual_seed(4), ways=ways, shots=shots, query=query
    )
    assert not torch.equal(other[1][0], xq)


def test_omniglot_layout_rotations_and_splits(omniglot_root, tmp_path):
    splits = load_splits("omniglot", DataSpec(root=str(omniglot_root), cache=str(tmp_path)))
    assert (splits.channels, splits.size) == (1, 28)
    assert [len(p) for p in (splits.train, splits.val, splits.test)] == [4 * 11, 4 * 1, 4 * 3]
    char = lambda name: name.rsplit("/", 1)[0]  # noqa: E731 (a class is a character + rotation)
    chars = [{char(n) for n in p.names} for p in (splits.train, splits.val, splits.test)]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
    assert len(set().union(*chars)) == 15
    x = splits.train.images(0, [0])
    rotated = splits.train.images(1, [0])  # the same character turned by 90 degrees
    assert splits.train.names[1].endswith("rot90")
    np.testing.assert_array_equal(np.rot90(x, 1, axes=(2, 3)), rotated)
    check_episodes(splits.train, 5, 1, 3, 1, 28)
    check_episodes(splits.test, 3, 2, 2, 1, 28)
    cached = load_splits("omniglot", DataSpec(root=str(omniglot_root), cache=str(tmp_path)))
    np.testing.assert_array_equal(cached.test.images(5, [1, 2]), splits.test.images(5, [1, 2]))


def test_imagenet_layout(imagenet_root):
    splits = load_splits("miniimagenet", DataSpec(root=str(imagenet_root), image_size=16))
    assert [p.names for p in (splits.train, splits.val, splits.test)] == [
        [f"n{s}{c:03d}" for c in range(n)] for s, n in (("train", 4), ("val", 3), ("test", 3))
    ]
    check_episodes(splits.train, 3, 1, 4, 3, 16)
    check_episodes(splits.test, 3, 2, 3, 3, 16)


def test_huggingface_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets not installed")
    rng = np.random.default_rng(2)

    def split(labels: range) -> datasets.Dataset:
        pixels = [rng.integers(0, 256, (10, 10), dtype=np.uint8) for _ in labels for _ in range(4)]
        features = {"image": datasets.Image(), "label": datasets.Value("int64")}
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels],
             "label": [c for c in labels for _ in range(4)]},
            features=datasets.Features(features),
        )  # fmt: skip

    saved = tmp_path / "hf"
    datasets.DatasetDict(
        {"train": split(range(0, 4)), "validation": split(range(4, 7)), "test": split(range(7, 10))}
    ).save_to_disk(str(saved))
    splits = load_splits("hf", DataSpec(root=str(saved), image_size=16))
    assert [sorted(p.names) for p in (splits.train, splits.val, splits.test)] == [
        ["0", "1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"]
    ]  # fmt: skip
    check_episodes(splits.train, 3, 1, 3, 1, 16)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images_background/<Alphabet>/<characterNN>"):
        load_splits("omniglot", DataSpec(root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"ROOT/train/<class>/\*\.jpg"):
        load_splits("tieredimagenet", DataSpec())
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_splits("fashion-mnist", DataSpec(root=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="fonts-noto-core"):
        load_glyphs(str(tmp_path), fonts={})


def test_glyphs_split_by_script_and_deterministic(tmp_path):
    fonts = find_fonts()
    if len(fonts) < 8:
        pytest.skip("glyphs need fonts: apt-get install -y fonts-noto-core")
    wanted = ["ARMENIAN", "GEORGIAN", "RUNIC", "OGHAM", "CHEROKEE", "HEBREW", "THAANA", "VAI"]
    subset = {k: v for k, v in fonts.items() if k in wanted}
    if len(subset) < 6:
        pytest.skip(f"glyphs test needs 6 of these scripts' fonts (fonts-noto-core): {wanted}")
    kw = {"size": 20, "instances": 3, "max_per_script": 6, "fonts": subset}
    g = load_glyphs(str(tmp_path / "a"), **kw)
    assert g.images.shape[1:] == (3, 20, 20) and g.images.dtype == np.uint8
    scripts = {s: {g.scripts[i] for i in g.classes(s)} for s in ("train", "val", "test")}
    assert scripts["train"] and scripts["test"]
    assert not (scripts["train"] & scripts["test"] or scripts["train"] & scripts["val"])
    assert len(set(g.chars)) == len(g.chars)  # each character one class
    assert len(list((tmp_path / "a").glob("glyphs-*.npz"))) == 1  # cached
    again = load_glyphs(str(tmp_path / "b"), **kw)  # generated anew: the same set
    np.testing.assert_array_equal(again.images, g.images)
    assert again.split == g.split


TINY = [
    "--dataset", "omniglot", "--ways", "3", "--shots", "1", "--query", "2", "--hidden", "4",
    "--image-size", "16", "--steps", "2", "--meta-batch", "2", "--meta-steps", "4",
    "--eval-every", "2", "--checkpoint-every", "3", "--val-tasks", "3", "--test-tasks", "6",
    "--test-steps", "2", "--no-progress", "--no-plots",
]  # fmt: skip


def test_fewshot_end_to_end_and_resume(omniglot_root, tmp_path, capsys):
    argv = [*TINY, "--root", str(omniglot_root), "--cache-dir", str(tmp_path / "cache"),
            "--methods", "first_order", "binomial:order=1",
            "implicit_cg:reg=2,maxiter=2"]  # fmt: skip
    full = fewshot_main([*argv, "--out", str(tmp_path / "full")])
    assert set(full["ranking"]) == {
        "first_order",
        "binomial(order=1)",
        "implicit_cg(reg=2,maxiter=2)",
    }
    for entry in full["methods"].values():
        assert 0 <= entry["test_accuracy"] <= 1 and entry["test_ci95"] > 0
    assert 0 <= full["untrained"]["test_accuracy"] <= 1
    records = read_jsonl(tmp_path / "full" / "first_order" / "metrics.jsonl")
    assert all(0 <= r["train/accuracy"] <= 1 for r in records)
    assert [r["step"] for r in records if "eval/val_accuracy" in r] == [2, 4]
    out = capsys.readouterr().out
    assert f"writing to {tmp_path / 'full' / 'first_order'}" in out and "95% CI" in out
    with pytest.raises(RunExistsError, match="--resume to continue"):
        fewshot_main([*argv, "--out", str(tmp_path / "full")])

    cut = tmp_path / "cut"
    part = fewshot_main([*argv, "--out", str(cut), "--stop-after", "3"])
    assert (
        part["interrupted"] and load_checkpoint(cut / "first_order" / "checkpoint.pt")["step"] == 3
    )
    resumed = fewshot_main([*argv, "--out", str(cut), "--resume"])
    assert "resumed from step 3" in capsys.readouterr().out
    drop = ("time_s", "elapsed_s")
    for label, entry in full["methods"].items():
        got = resumed["methods"][label]
        assert {k: v for k, v in got.items() if not k.endswith(drop)} == {
            k: v for k, v in entry.items() if not k.endswith(drop)
        }


def test_vmap_over_tasks_matches_the_loop(omniglot_root, tmp_path):
    argv = [*TINY, "--root", str(omniglot_root), "--cache-dir", str(tmp_path / "cache"),
            "--methods", "exact", "--meta-steps", "2", "--test-tasks", "2",
            # SGD, not Adam: Adam turns the float noise of the conv biases that batch norm
            # cancels (true meta-gradient 0) into full-size steps
            "--outer-optimizer", "sgd", "--outer-lr", "0.1"]  # fmt: skip
    loop = fewshot_main([*argv, "--out", str(tmp_path / "loop")])
    batched = fewshot_main([*argv, "--out", str(tmp_path / "vmap"), "--vmap-tasks"])
    a, b = (torch.load(tmp_path / d / "exact" / "checkpoint.pt", weights_only=True)["model"]
            for d in ("loop", "vmap"))  # fmt: skip
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert math.isclose(loop["methods"]["exact"]["test_accuracy"],
                        batched["methods"]["exact"]["test_accuracy"], abs_tol=1e-6)  # fmt: skip


def test_outer_schedule_and_inner_optimizer_options():
    cosine = TrainConfig(outer_lr=1.0, outer_schedule="cosine", outer_decay_steps=4)
    assert [round(outer_lr_at(cosine, s), 6) for s in (0, 2, 4, 9)] == [1.0, 0.5, 0.0, 0.0]
    step = TrainConfig(outer_lr=1.0, outer_schedule="step", outer_decay_steps=2, outer_gamma=0.1)
    assert [round(outer_lr_at(step, s), 6) for s in (0, 1, 2, 5)] == [1.0, 1.0, 0.1, 0.01]
    with pytest.raises(ValueError, match="--outer-decay-steps"):
        TrainConfig(outer_schedule="cosine")
    assert make_inner_optimizer("sgd", 0.1) is None  # plain GD: tmg.adapt's lr=
    assert make_inner_optimizer("adam:betas=0.5/0.9", 0.1) is not None
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        make_inner_optimizer("lion", 0.1)
    with pytest.raises(ValueError, match="--inner-optimizer sgd:nesterov"):
        make_inner_optimizer("sgd:nesterov", 0.1)


def test_sine_with_inner_momentum_and_schedule(tmp_path):
    from recipes.sine import main as sine_main

    argv = ["--mode", "train", "--rule", "exact", "--steps", "2", "--meta-steps", "3",
            "--meta-batch", "2", "--eval-every", "3", "--test-tasks", "3", "--test-steps", "2",
            "--no-progress", "--no-plots", "--inner-optimizer", "sgd:momentum=0.9",
            "--outer-optimizer", "sgd", "--outer-schedule", "step", "--outer-decay-steps", "1",
            "--out", str(tmp_path)]  # fmt: skip
    result = sine_main(argv)["train"]
    assert result["completed"] and all(math.isfinite(v) for v in result["test_curve"]["mean"])
    with pytest.raises(SystemExit):
        sine_main([*argv, "--learn-lr", "scalar", "--overwrite"])  # a learned lr is plain GD's


def test_fashion_mnist_from_debian_package():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
    splits = load_splits("fashion-mnist", DataSpec())
    assert [len(p) for p in (splits.train, splits.val, splits.test)] == [5, 5, 5]
    assert [splits.train.count(c) for c in range(5)] == [6000] * 5
    assert [splits.test.count(c) for c in range(5)] == [1000] * 5
    assert not set(splits.train.names) & set(splits.test.names)
    check_episodes(splits.test, 5, 5, 15, 1, 28)


def test_paper_table_gaps_to_maml():
    from recipes.fewshot.paper import paper_table

    def res(maml: float, fo: float) -> dict:
        entry = lambda a: {"test_accuracy": a, "test_ci95": 0.01}  # noqa: E731
        return {"methods": {"FOMAML": entry(fo), "MAML": entry(maml)}, "untrained": entry(0.3)}

    table = paper_table({1: res(0.50, 0.48), 5: res(0.65, 0.655)})
    assert "| FOMAML         | 48.00 ± 1.00 (-2.00) | 65.50 ± 1.00 (+0.50) |" in table
    assert "| MAML           |         50.00 ± 1.00 |" in table and "untrained init" in table


def test_resnet12_meta_gradient_runs():
    import torchopt_metagrad as tmg
    from recipes.fewshot.models import make_model

    torch.manual_seed(0)
    net = make_model("resnet12", ways=3, channels=3, image_size=16, hidden=4)
    assert not list(net.buffers())  # batch statistics only: a pure loss, vmap-able
    x, y = torch.randn(6, 3, 16, 16), torch.arange(3).repeat(2)

    def loss_fn(p, batch):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, p, (batch[0],)),
                                                 batch[1])  # fmt: skip

    params = dict(net.named_parameters())
    adapted = tmg.adapt(loss_fn, params, (x, y), steps=2, lr=0.1, rule=tmg.Binomial(1))
    loss_fn(adapted, (x, y)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())


def test_sine_methods_comparison(tmp_path):
    from recipes.sine import main as sine_main

    argv = ["--mode", "train", "--methods", "exact", "first_order", "--steps", "2",
            "--meta-steps", "2", "--meta-batch", "2", "--eval-every", "1", "--test-tasks", "3",
            "--test-steps", "2", "--no-progress", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    result = sine_main(argv)["train"]
    assert set(result["ranking"]) == {"exact", "first_order"}
    assert (tmp_path / "train" / "first_order" / "checkpoint.pt").is_file()
    assert (tmp_path / "train" / "summary.csv").is_file()
