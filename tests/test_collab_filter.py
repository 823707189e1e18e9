"""The collaborative-filtering recipe: each loader on tiny files written here, malformed lines
reported with their line number, the paper's preprocessing counted by hand, the task split
and resampling, the metric, the synthetic stand-ins, the ml-100k fetch from a wheel, and a
tiny end-to-end study with a stop and an exact resume."""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from recipes.collab_filter import main
from recipes.collab_filter.fetch_ml100k import MEMBER
from recipes.collab_filter.fetch_ml100k import main as fetch_main
from recipes.collab_filter.loaders import RatingsFormatError, load_ratings
from recipes.collab_filter.paper import paper_table
from recipes.collab_filter.synthetic import SyntheticSpec, generate
from recipes.collab_filter.tasks import CollabFilterProblem, build_tasks, masked_rmse
from recipes.common.checkpoint import CheckpointError, load_checkpoint

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def triples(r) -> list[tuple[str, str, float]]:
    return [
        (r.user_ids[u], r.item_ids[i], float(v))
        for u, i, v in zip(r.user.tolist(), r.item.tolist(), r.rating.tolist(), strict=True)
    ]


def test_movielens_loaders(tmp_path):
    rows = [("196", "242", 3), ("186", "302", 3), ("196", "377", 1)]
    udata = write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t88125094{n}\n"
                                               for n, (u, i, r) in enumerate(rows)))  # fmt: skip
    dat = write(
        tmp_path / "ratings.dat", "".join(f"{u}::{i}::{r}::978300760\n" for u, i, r in rows)
    )
    inter = write(tmp_path / "ml-100k.inter", HEADER + udata.read_text())
    expected = [(u, i, float(r)) for u, i, r in rows]
    for path in (udata, dat, inter):
        found = load_ratings(path)
        assert triples(found) == expected
        assert found.scale == (1.0, 5.0)
        assert found.user_ids == ("196", "186") and found.user.tolist() == [0, 1, 0]


def test_jester_csv_with_missing_code(tmp_path):
    path = write(tmp_path / "jester.csv", "3,1.5,99,-9.8,10\n1,99,99,0.0,99\n")
    found = load_ratings(path)
    assert triples(found) == [("1", "1", 1.5), ("1", "3", -9.8), ("1", "4", 10.0),
                              ("2", "3", 0.0)]  # fmt: skip
    assert found.scale == (-10.0, 10.0)
    bad = write(tmp_path / "bad.csv", "3,1.5,99,-9.8,10\n2,99,99,0.0,99\n")
    with pytest.raises(RatingsFormatError, match=r"bad\.csv, line 2: the first column says 2"):
        load_ratings(bad)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("u.data", "1\t2\t3\t4\n1\t3\t4\t5\n1\t4\t5\n", r"line 3: expected 4 '\\t'-separated"),
        ("u.data", "1\t2\t3\t4\n1\t3\tfour\t5\n", r"line 2: rating 'four' is not a number"),
        ("u.data", "1\t2\t3\t4\n\n1\t3\t4\t5\n", r"line 2: expected 4"),
        ("u.data", "1\t2\t3\t4\n1\t3\t6\t5\n", r"line 2: rating 6 is outside the scale \[1, 5\]"),
        ("u.data", "1\t2\t3\t4\n1\t2\t4\t5\n", r"line 2: user 1 rated item 2 already on line 1"),
        ("ratings.dat", "1::2::3::4\n1::3::4::x\n", r"line 2: timestamp 'x' is not a number"),
        ("ml-100k.inter", "user\titem\trating\ttime\n1\t2\t3\t4\n", r"line 1: expected the header"),
        ("ml-100k.inter", HEADER + "1\t2\t3\t4\n1\t3\tnan\t5\n", r"line 3: rating 'nan' is not"),
        ("j.csv", "1,5,99\n1,5,99,99\n", r"line 2: expected 3 columns, found 4"),
        ("j.csv", "1,5,99\n1,12,99\n", r"line 2: rating 12 is outside the scale \[-10, 10\]"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(RatingsFormatError, match=message) as err:
        load_ratings(path)
    assert str(path) in str(err.value)


def test_jester_xls_without_xlrd_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xlrd", None)  # import xlrd -> ImportError
    path = write(tmp_path / "jester-data-1.xls", "not read")
    with pytest.raises(ImportError, match=r"optional package 'xlrd' \(pip install xlrd\)"):
        load_ratings(path)
    with pytest.raises(ValueError, match="--format"):
        load_ratings(write(tmp_path / "ratings.txt", "1\t2\t3\t4\n"))


def tiny_ratings(tmp_path: Path) -> Path:
    """Items a..e rated 5, 4, 4, 2, 1 times (c after b in the file: ties by first
    appearance); users u1 (a, b, c, d), u2 (a, b, c), u3 (a, c, e), u4 (a, b), u5 (a, d)."""
    rated = {"u1": "abcd", "u2": "abc", "u3": "ace", "u4": "ab", "u5": "ad"}
    lines = [f"{u}\t{i}\t{1 + (n % 5)}\t0\n" for n, (u, s) in enumerate(rated.items()) for i in s]
    return write(tmp_path / "u.data", "".join(lines))


def test_preprocessing_counts(tmp_path):
    ratings = load_ratings(tiny_ratings(tmp_path))
    tasks = build_tasks(ratings, n_items=3, min_ratings=3)
    assert tasks.item_ids == ("a", "b", "c")  # 5, 4, 4 ratings; b before c in the file
    # kept ratings per user: u1 3 (a, b, c), u2 3, u3 2 (a, c), u4 2, u5 1
    assert tasks.users == ["u1", "u2"] and tasks.sizes().tolist() == [3, 3]
    assert [t.tolist() for t in tasks.items] == [[0, 1, 2], [0, 1, 2]]  # one-hot positions
    assert build_tasks(ratings, n_items=3, min_ratings=2).users == ["u1", "u2", "u3", "u4"]
    u3 = build_tasks(ratings, n_items=3, min_ratings=2)
    assert u3.items[2].tolist() == [0, 2] and u3.ratings[2].tolist() == [3.0, 3.0]  # u3 rates 3
    with pytest.raises(ValueError, match="no user has >= 4 ratings"):
        build_tasks(ratings, n_items=3, min_ratings=4)
    with pytest.raises(ValueError, match="--items 6: the data has 5 items"):
        build_tasks(ratings, n_items=6)


def small_problem(shots: int = 3, query: int = 4, test_tasks: int = 5) -> CollabFilterProblem:
    spec = SyntheticSpec("t", users=40, items=12, min_per_user=4, mean_per_user=8.0,
                         spread_per_user=0.5, popularity=0.5, scale=(1.0, 5.0),
                         star_counts=(1, 2, 3, 3, 1))  # fmt: skip
    tasks = build_tasks(generate(spec, seed=3), n_items=10, min_ratings=4)
    return CollabFilterProblem(tasks, shots=shots, query=query, test_tasks=test_tasks,
                               inner_lr=0.01, eval_steps=2, seed=0, device=torch.device("cpu"),
                               dtype=torch.float64)  # fmt: skip


def test_split_and_resampling():
    problem = small_problem()
    sizes = problem.tasks.sizes()
    test, train, pool = (set(x.tolist()) for x in (problem.test_index, problem.train_index,
                                                    problem.pool))  # fmt: skip
    assert len(test) == 5 and not test & train and len(test | train) == len(problem.tasks)
    assert all(sizes[t] > 3 for t in test)
    assert pool == {t for t in train if sizes[t] >= 7}  # the too-small ones are never drawn
    assert 0 < len(pool) < len(train)  # this data has both kinds
    counts = problem.counts()
    assert counts["train_tasks_too_small"] == len(train) - len(pool)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        batch = problem.sample_tasks(gen, 4)
        for (xs, ys), (xq, yq) in batch:
            assert xs.shape == (3, 10) and ys.shape == (3, 1)
            assert xq.shape == (4, 10) and yq.shape == (4, 1)
            assert (xs.sum(1) == 1).all() and (xq.sum(1) == 1).all()
            items = torch.cat([xs, xq]).argmax(1)
            assert len(set(items.tolist())) == 7  # support and query are disjoint ratings
            owner = [t for t in pool if set(items.tolist()) <= set(problem.tasks.items[t].tolist())]
            seen.update(owner)
    assert seen <= pool
    with pytest.raises(ValueError, match="--meta-batch 999"):
        problem.sample_tasks(gen, 999)
    # test sets: support `shots` ratings, the rest scored, padding weighted 0
    (xs, ys), (xq, yq) = problem.test_support, problem.test_query
    assert xs.shape == (5, 3, 10)
    scored = yq[..., 1].sum(1)
    assert scored.tolist() == [float(sizes[t] - 3) for t in problem.test_index.tolist()]
    with pytest.raises(ValueError, match="--test-tasks 999"):
        small_problem(test_tasks=999)


def test_masked_rmse_ignores_padding():
    pred = torch.tensor([[1.0], [2.0], [7.0]])
    target = torch.tensor([[2.0, 1.0], [4.0, 1.0], [0.0, 0.0]])
    assert masked_rmse(pred, target).item() == pytest.approx(math.sqrt((1 + 4) / 2))


def test_synthetic_is_deterministic_and_matches_the_star_histogram():
    spec = SyntheticSpec("t", users=300, items=50, min_per_user=5, mean_per_user=12.0,
                         spread_per_user=0.7, popularity=1.0, scale=(1.0, 5.0),
                         star_counts=(1, 2, 3, 3, 1))  # fmt: skip
    a, b, c = generate(spec, 1), generate(spec, 1), generate(spec, 2)
    assert torch.equal(a.rating, b.rating) and torch.equal(a.item, b.item)
    assert not torch.equal(a.item, c.item)
    share = torch.bincount(a.rating.long(), minlength=6)[1:].double() / len(a)
    assert share.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.1], abs=1e-3)
    per_user = torch.bincount(a.user)
    assert per_user.min() >= 5 and per_user.max() <= 50
    pairs = a.user * 1000 + a.item
    assert pairs.unique().numel() == len(a)  # no item rated twice by a user


def test_fetch_from_a_wheel(tmp_path, capsys):
    wheel = tmp_path / "recbole-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, HEADER + "1\t2\t3\t4\n2\t2\t5\t4\n")
    target = fetch_main(["--wheel", str(wheel), "--out", str(tmp_path / "out")])
    assert target == tmp_path / "out" / "ml-100k.inter"
    assert "2 ratings, 2 users, 1 items" in capsys.readouterr().out
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("other", "")
    with pytest.raises(KeyError, match="has no recbole/dataset_example"):
        fetch_main(["--wheel", str(wheel), "--out", str(tmp_path / "out2")])


def test_paper_table_layout():
    results = [
        {"dataset": "ml-100k", "setting": "10shot-15val",
         "methods": {"A": {"nrmse_at_steps": 0.25, "nrmse_std_at_steps": 0.05}}},
        {"dataset": "synthetic-ml-1m", "setting": "20shot-30val",
         "methods": {"B": {"nrmse_at_steps": 0.125, "nrmse_std_at_steps": 0.01}}},
    ]  # fmt: skip
    lines = paper_table(results).splitlines()
    assert "ml-100k 10shot-15val" in lines[0] and "synthetic-ml-1m 20shot-30val" in lines[0]
    assert [c.strip() for c in lines[2].split("|")[1:4]] == ["A", "0.250 ± 0.050", "-"]
    assert "0.125 ± 0.010" in lines[3]
    results[0].update(steps=50, maml_steps=5, methods={"MAML": results[0]["methods"]["A"]})
    lines = paper_table(results).splitlines()  # the paper's Table 1 beside ml-100k
    assert [c.strip() for c in lines[0].split("|")[1:4]] == ["method", "ml-100k 10shot-15val",
                                                             "paper"]  # fmt: skip
    assert [c.strip() for c in lines[2].split("|")[1:4]] == ["MAML", "0.250 ± 0.050",
                                                             "0.123 ± 0.001"]  # fmt: skip


def tiny_study(tmp_path: Path) -> list[str]:
    path = tmp_path / "u.data"
    gen = torch.Generator().manual_seed(0)
    lines = []
    for u in range(30):
        items = torch.randperm(12, generator=gen)[: 6 + u % 5]
        lines += [f"{u}\t{i}\t{1 + (u + i) % 5}\t0\n" for i in items.tolist()]
    write(path, "".join(lines))
    return [
        "--data", str(path), "--items", "10", "--min-ratings", "5", "--shots", "3",
        "--query-shots", "3", "--test-tasks", "6", "--steps", "3", "--methods", "first_order",
        "exact:steps=2,label=MAML", "--meta-steps", "4", "--meta-batch", "2",
        "--eval-every", "2", "--checkpoint-every", "3", "--test-steps", "0", "3",
        "--no-progress", "--no-plots",
    ]  # fmt: skip


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items()
                if not (k.endswith("time_s") or k in ("elapsed_s", "interrupted"))}  # fmt: skip
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def test_end_to_end_two_methods_and_resume(tmp_path):
    argv = tiny_study(tmp_path)
    full = main([*argv, "--out", str(tmp_path / "full")])
    assert set(full["ranking"]) == {"first_order", "MAML"}
    assert full["tasks"]["tasks"] == 30 and full["tasks"]["test_tasks"] == 6
    written = json.loads((tmp_path / "full" / "results.json").read_text())
    assert list(written)[:2] == ["dataset", "setting"] and written["ranking"] == full["ranking"]
    for entry in full["methods"].values():
        assert len(entry["nrmse_mean"]) == 2 and all(0 < v < 1 for v in entry["nrmse_mean"])
        assert entry["paper"] is None
    cut = tmp_path / "cut"
    # one process stops first_order at step 2, another trains MAML (--only), then the
    # whole study resumes: the same numbers as the uninterrupted one
    part = main([*argv, "--out", str(cut), "--stop-after", "2", "--only", "first_order"])
    assert part["interrupted"] and "ranking" not in part
    assert load_checkpoint(cut / "first_order" / "checkpoint.pt")["step"] == 2
    other = main([*argv, "--out", str(cut), "--resume", "--only", "MAML"])
    assert other["ranking"] == ["MAML"]
    resumed = main([*argv, "--out", str(cut), "--resume"])
    assert without_times(resumed) == without_times(full)
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(cut), "--resume", "--only", "iMAML"])
    other_data = tmp_path / "other" / "u.data"
    other_data.parent.mkdir()
    other_data.write_text(Path(argv[1]).read_text().replace("\t1\t0\n", "\t2\t0\n", 1))
    with pytest.raises(CheckpointError, match="was started on other ratings"):
        main([*argv[2:], "--data", str(other_data), "--out", str(cut), "--resume"])
    moved = tmp_path / "moved.data"  # the same ratings elsewhere: fine
    moved.write_text(Path(argv[1]).read_text())
    assert main([*argv[2:], "--data", str(moved), "--out", str(cut), "--resume"])["ranking"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        main([*argv[2:], "--data", str(tmp_path / "missing.data"), "--out", str(tmp_path / "m")])


def test_plots_of_a_finished_study(tmp_path):
    """With plots on: nRMSE against meta-steps and against test-time adaptation steps."""
    argv = [a for a in tiny_study(tmp_path) if a != "--no-plots"]
    main([*argv, "--out", str(tmp_path / "plots")])
    for name in ("test_nrmse_vs_meta_step.png", "nrmse_vs_adaptation_steps.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000, name
