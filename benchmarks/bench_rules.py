#!/usr/bin/env python
"""Benchmark the meta-gradient rules of torchopt_metagrad against torchopt's unrolled MetaSGD.

For each workload (``sine``: MLP 1-40-40-1; ``conv``: 4-conv 5-way 1-shot net, see
``models.py``), each number of inner steps K and each rule, one *call* computes the
meta-gradient of a whole meta-batch (default 4 tasks; outer loss averaged over the tasks,
``.backward()`` once per task, gradients accumulated on the network's parameters):

* ours: per task ``tmg.adapt(loss_fn, params, support, steps=K, lr=lr, rule=rule)`` then
  ``(outer_loss(adapted) / T).backward()``;
* torchopt: per task ``inner_opt.step(inner_loss)`` K times with
  ``torchopt.MetaSGD(net, lr)``, ``(outer_loss / T).backward()``, parameters and optimizer
  state restored with ``torchopt.extract_state_dict`` / ``torchopt.recover_state_dict``
  (as in torchopt's MAML Omniglot example).

Measured per call:

* time: best of ``--repeats`` runs, all sides (ours and torchopt) interleaved within each
  repeat, in a rotating order;
* peak live tensor bytes: one extra run under
  :class:`torchopt_metagrad.diagnostics.LiveMemoryTracker` (storages allocated during the
  call, freed ones subtracted, running maximum);
* peak RSS delta: during the timed runs (the kernel's RSS high-water mark is reset before
  each run where Linux allows it), peak RSS minus the RSS at the start of the run;
  minimum over repeats. It mixes in allocator caching and is coarse.

Derived: the memory growth per extra inner step (least-squares slope of peak live bytes
vs K), Exact's slope / torchopt's slope (target <= 0.1), Exact / torchopt time (target
<= 1.2), and ``Binomial(L, vectorize=True)`` (stage HVPs batched with vmap) vs
``Binomial(L, vectorize=False)`` (the same HVPs one by one).

The Markdown report goes to stdout (and ``--output``); progress goes to stderr.

Examples::

    python benchmarks/bench_rules.py --quick
    python benchmarks/bench_rules.py --models sine --ks 5 10 25 --rules exact unrolled
    python benchmarks/bench_rules.py --models conv --ks 100 --rules exact implicit_cg:reg=1
    nohup python benchmarks/bench_rules.py > benchmarks/results_cpu.md 2> bench.log &
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchopt
from torch import nn
from torch.func import functional_call

# The repository root, for the shared workloads/ package and benchmarks/models.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchopt_metagrad as tmg
from benchmarks.models import WORKLOADS, Task, Workload
from torchopt_metagrad.diagnostics import (
    LiveMemoryTracker,
    peak_rss_bytes,
    reset_peak_rss,
)

DEFAULT_RULES = [
    "first_order",
    "truncated:order=2",
    "binomial:order=1",
    "binomial:order=2",
    "exact",
    "unrolled",
]
DEFAULT_KS = [5, 10, 25, 50, 100]
TORCHOPT = "torchopt.MetaSGD"
MiB = float(2**20)
KiB = 1024.0

#: The older call form of a rule on the command line: ``Binomial(2)``, ``Exact``.
_CALL_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def log(msg: str) -> None:
    """Progress line on stderr (the report itself goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class RuleSpec:
    """A rule from the command line, and a suffix for its label (``" loop"``)."""

    rule: tmg.AbstractRule
    suffix: str = ""

    @property
    def label(self) -> str:
        """Its row in the tables, in call form: ``Binomial(2)``, ``ImplicitCG(1.0)``, ``Exact``.

        Required knobs are shown positionally, the others when they differ from their
        defaults (``vectorize`` not in a ``" loop"`` row, whose suffix says it).
        """
        shown = []
        for f in dataclasses.fields(self.rule):
            if not f.init or (self.suffix and f.name == "vectorize"):
                continue
            value = getattr(self.rule, f.name)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                shown.append(repr(value) if not f.kw_only else f"{f.name}={value!r}")
            elif f.default is dataclasses.MISSING or value != f.default:
                shown.append(f"{f.name}={value!r}")
        name = type(self.rule).__name__
        return (f"{name}({', '.join(shown)})" if shown else name) + self.suffix

    def build(self) -> tmg.AbstractRule:
        """A fresh copy of the rule (rules such as ImplicitCG log their last solve)."""
        return dataclasses.replace(self.rule)

    def looped(self) -> RuleSpec | None:
        """The same rule with ``vectorize=False``, if it has that knob set to True."""
        if not getattr(self.rule, "vectorize", False):
            return None
        return RuleSpec(dataclasses.replace(self.rule, vectorize=False), " loop")


def _spec_text(text: str) -> str:
    """``text`` in the library's spec form; the call form ``Binomial(2)`` is rewritten.

    Call form: a rule's class or registry name (any case, underscores optional) with
    Python literal arguments, positional ones taken by the rule's positional fields in
    order: ``Binomial(2)`` -> ``binomial:order=2``,
    ``ImplicitCG(1.0, maxiter=10)`` -> ``implicit_cg:reg=1.0,maxiter=10``.
    """
    m = _CALL_RE.match(text)
    if m is None:
        return text  # a spec: tmg.parse_rule reads it (and reports what is wrong)
    names = {}
    for name in tmg.available_rules():
        names[tmg.rule_class(name).__name__.lower()] = name
        names[name.replace("_", "")] = name
    name = names.get(m.group(1).lower().replace("_", ""))
    if name is None or not m.group(2):
        return name or text
    try:
        call = ast.parse(f"f({m.group(2)})", mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError("not a call")
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = [(k.arg or "", ast.literal_eval(k.value)) for k in call.keywords]
    except (SyntaxError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"bad rule arguments in {text!r}: {err}") from None
    fields = dataclasses.fields(tmg.rule_class(name))
    positional = [f.name for f in fields if f.init and not f.kw_only]
    if len(args) > len(positional):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {name} takes at most {len(positional)} positional arguments "
            f"({', '.join(positional) or 'none'})"
        )

    def show(value: Any) -> str:
        if value is None or isinstance(value, bool):
            return str(value).lower()
        return str(value)

    items = [f"{k}={show(v)}" for k, v in [*zip(positional, args), *kwargs]]
    return f"{name}:{','.join(items)}" if items else name


def parse_rule(text: str) -> RuleSpec:
    """A rule spec (``binomial:order=2``, ``exact``) or the call form (``Binomial(2)``)."""
    try:
        return RuleSpec(tmg.parse_rule(_spec_text(text)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ------------------------------------------------------------------------------- sides
@dataclass
class Side:
    """One way of computing the meta-batch gradient: a tmg rule or torchopt."""

    label: str
    net: nn.Module
    run: Callable[[list[Task], int], None]
    is_ours: bool = True


def make_ours(net: nn.Module, wl: Workload, spec: RuleSpec) -> Side:
    """A side that computes the meta-gradient with ``tmg.adapt`` and ``spec``'s rule."""
    params = dict(net.named_parameters())
    rule = spec.build()

    def loss_fn(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x, y = batch
        return wl.loss(functional_call(net, p, (x,)), y)

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        n = len(tasks)
        for support, query in tasks:
            adapted = tmg.adapt(loss_fn, params, support, steps=steps, lr=wl.inner_lr, rule=rule)
            (loss_fn(adapted, query) / n).backward()

    return Side(spec.label, net, run, is_ours=True)


def make_module(net: nn.Module, wl: Workload, spec: RuleSpec) -> Side:
    """Our module front end in its lean mode: ``tmg.MetaSGD(net, lr, rule=...)``, ``step(closure)``.

    The same loop as :func:`make_torchopt`, only the constructor line and ``step``'s
    argument (a closure instead of a loss) differ.
    """
    inner_opt = tmg.MetaSGD(net, lr=wl.inner_lr, rule=spec.build())

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        n = len(tasks)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for (xs, ys), (xq, yq) in tasks:
            for _ in range(steps):
                inner_opt.step(lambda xs=xs, ys=ys: wl.loss(net(xs), ys))
            (wl.loss(net(xq), yq) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

    return Side(f"tmg.MetaSGD closure {spec.label}", net, run, is_ours=True)


def make_torchopt(net: nn.Module, wl: Workload) -> Side:
    """torchopt's module API: MetaSGD steps, outer backward, state restored per task."""
    inner_opt = torchopt.MetaSGD(net, lr=wl.inner_lr)

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        n = len(tasks)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for (xs, ys), (xq, yq) in tasks:
            for _ in range(steps):
                inner_opt.step(wl.loss(net(xs), ys))
            (wl.loss(net(xq), yq) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

    return Side(TORCHOPT, net, run, is_ours=False)


# -------------------------------------------------------------------------- measuring
def current_rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def grads_of(net: nn.Module) -> torch.Tensor:
    """All parameter gradients as one flat vector (zeros for missing ones)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
            for p in net.parameters()
        ]
    )


@dataclass
class Result:
    """Measurements of one (workload, K, side)."""

    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    peak_live: int | None = None
    error: str | None = None
    skipped: str | None = None

    @property
    def time(self) -> float | None:
        """Best time over repeats."""
        return min(self.times) if self.times else None

    @property
    def rss_delta(self) -> int | None:
        """Smallest peak-RSS delta over repeats."""
        return min(self.rss) if self.rss else None


def timed_call(side: Side, tasks: list[Task], steps: int, rss_ok: bool) -> tuple[float, int | None]:
    """Run one call; return seconds and the peak-RSS delta (None if it cannot be reset)."""
    gc.collect()
    rss_reset = rss_ok and reset_peak_rss()
    base = current_rss_bytes()
    t0 = time.perf_counter()
    side.run(tasks, steps)
    elapsed = time.perf_counter() - t0
    rss = max(peak_rss_bytes() - base, 0) if rss_reset and base else None
    return elapsed, rss


def tracked_call(side: Side, tasks: list[Task], steps: int) -> int:
    """Run one call under the live-memory tracker; return its peak live bytes."""
    side.net.zero_grad(set_to_none=True)
    gc.collect()
    with LiveMemoryTracker() as mem:
        side.run(tasks, steps)
    return mem.peak_bytes


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys vs xs (None with fewer than two points)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


# ----------------------------------------------------------------------------- driver
def machine_info(args: argparse.Namespace) -> str:
    """One header line: platform, CPU, threads, versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return (
        f"Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, "
        f"torch.get_num_threads()={torch.get_num_threads()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchopt {torchopt.__version__}, "
        f"torchopt_metagrad {getattr(tmg, '__version__', '?')}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"meta-batch {args.meta_batch}, repeats {args.repeats}, seed {args.seed}"
    )


def bench_workload(
    wl: Workload, args: argparse.Namespace, specs: list[RuleSpec]
) -> tuple[list[str], dict[tuple[int, str], Result], dict[str, float]]:
    """Run every side at every K for one workload; return labels, results and checks."""
    torch.manual_seed(args.seed)
    base = wl.make_net()
    sides = [make_ours(copy.deepcopy(base), wl, spec) for spec in specs]
    sides += [make_module(copy.deepcopy(base), wl, spec) for spec in args.module_rules]
    sides.append(make_torchopt(copy.deepcopy(base), wl))
    labels = [s.label for s in sides]
    gen = torch.Generator().manual_seed(args.seed)
    tasks = wl.sample_tasks(args.meta_batch, gen)
    results: dict[tuple[int, str], Result] = {}
    broken: dict[str, str] = {}

    # warm-up on one task at the smallest K, and agreement with torchopt's gradient
    k0 = min(args.ks)
    log(f"{wl.name}: warm-up and gradient check at K={k0}")
    check: dict[str, float] = {}
    ref = None
    for side in reversed(sides):  # torchopt first
        try:
            side.run(tasks[:1], k0)
        except Exception as exc:
            broken[side.label] = f"{type(exc).__name__}: {exc}"
            log(f"  {side.label}: ERROR {broken[side.label]}")
            continue
        g = grads_of(side.net)
        if ref is None:
            ref = g
        else:
            check[side.label] = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
    per_call_estimate: dict[str, tuple[int, float]] = {}

    for steps in sorted(args.ks):
        active: list[Side] = []
        for side in sides:
            res = results.setdefault((steps, side.label), Result())
            if side.label in broken:
                res.error = broken[side.label]
                continue
            est = per_call_estimate.get(side.label)
            if est is not None and args.max_call_seconds > 0:
                predicted = est[1] * steps / est[0]
                if predicted > args.max_call_seconds:
                    res.skipped = f"predicted {predicted:.0f}s > --max-call-seconds"
                    continue
            active.append(side)
        log(f"{wl.name} K={steps}: timing {len(active)} sides x {args.repeats} repeats")
        for rep in range(args.repeats):
            shift = rep % max(len(active), 1)
            for side in active[shift:] + active[:shift]:
                res = results[(steps, side.label)]
                if res.error:
                    continue
                try:
                    elapsed, rss = timed_call(side, tasks, steps, not args.no_rss)
                except Exception as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                    log(f"  {side.label}: ERROR {res.error}")
                    continue
                res.times.append(elapsed)
                if rss is not None:
                    res.rss.append(rss)
                log(f"  rep {rep} {side.label}: {elapsed:.3f}s")
        for side in active:
            res = results[(steps, side.label)]
            if res.time is not None:
                per_call_estimate[side.label] = (steps, res.time)
        if not args.no_memory:
            for side in active:
                res = results[(steps, side.label)]
                if res.error:
                    continue
                try:
                    res.peak_live = tracked_call(side, tasks, steps)
                except Exception as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                    continue
                log(f"  mem {side.label}: {res.peak_live / MiB:.2f} MiB live")
        for side in active:
            side.net.zero_grad(set_to_none=True)
    return labels, results, check


def fmt(x: float | None, spec: str = ".3f") -> str:
    """Format a number or an em dash."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def report_workload(
    wl: Workload,
    args: argparse.Namespace,
    labels: list[str],
    results: dict[tuple[int, str], Result],
    check: dict[str, float],
) -> list[str]:
    """Markdown section for one workload."""
    ks = sorted(args.ks)
    out = [f"## {wl.name}: {wl.description}", ""]
    out.append(
        "| K | rule | time / call (s) | × torchopt | peak live (MiB) | × torchopt "
        "| peak RSS Δ (MiB) |"
    )
    out.append("|---:|:---|---:|---:|---:|---:|---:|")
    notes: list[str] = []
    for steps in ks:
        ref = results.get((steps, TORCHOPT), Result())
        for label in labels:
            r = results.get((steps, label), Result())
            if r.error or r.skipped:
                why = r.error or r.skipped or ""
                if r.error:
                    notes.append(f"K={steps} {label}: {why}")
                out.append(f"| {steps} | {label} | {'error' if r.error else 'skipped'} | | | | |")
                continue
            is_ref = label == TORCHOPT
            live = None if r.peak_live is None else r.peak_live / MiB
            rss = None if r.rss_delta is None else r.rss_delta / MiB
            out.append(
                f"| {steps} | {'**' + label + '**' if is_ref else label} | {fmt(r.time)} "
                f"| {'' if is_ref else fmt(ratio(r.time, ref.time), '.2f')} "
                f"| {fmt(live, '.2f')} "
                f"| {'' if is_ref else fmt(ratio(r.peak_live, ref.peak_live), '.2f')} "
                f"| {fmt(rss, '.1f')} |"
            )
    out.append("")

    # memory growth per extra inner step
    out.append("Memory growth per extra inner step (least-squares slope of peak live vs K):")
    out.append("")
    out.append("| rule | KiB / step | × torchopt | Ks used |")
    out.append("|:---|---:|---:|:---|")
    slopes: dict[str, float | None] = {}
    for label in labels:
        pts = [
            (float(k), float(results[(k, label)].peak_live or 0))
            for k in ks
            if (k, label) in results and results[(k, label)].peak_live is not None
        ]
        slopes[label] = slope([p[0] for p in pts], [p[1] for p in pts])
    for label in labels:
        s = slopes[label]
        r_s = ratio(s, slopes.get(TORCHOPT))
        pts_k = [k for k in ks if results.get((k, label), Result()).peak_live is not None]
        out.append(
            f"| {label} | {fmt(None if s is None else s / KiB, '.1f')} "
            f"| {'' if label == TORCHOPT else fmt(r_s, '.3f')} | {pts_k} |"
        )
    out.append("")

    targets: list[str] = []
    for label in ["Exact", *(f"tmg.MetaSGD closure {s.label}" for s in args.module_rules)]:
        s_ratio = ratio(slopes.get(label), slopes.get(TORCHOPT))
        if s_ratio is not None:
            ok = "PASS" if s_ratio <= 0.1 else "FAIL"
            targets.append(
                f"* {label} / torchopt memory slope = {s_ratio:.3f} (target <= 0.1: **{ok}**)"
            )
    t_ratios = [
        (k, ratio(results[(k, "Exact")].time, results[(k, TORCHOPT)].time))
        for k in ks
        if (k, "Exact") in results and (k, TORCHOPT) in results
    ]
    t_ratios = [(k, r) for k, r in t_ratios if r is not None]
    if t_ratios:
        geo = math.exp(sum(math.log(r) for _, r in t_ratios if r and r > 0) / len(t_ratios))
        worst = max(r for _, r in t_ratios if r is not None)
        ok = "PASS" if worst <= 1.2 else ("PASS on geo-mean only" if geo <= 1.2 else "FAIL")
        per_k = ", ".join(f"K={k}: {r:.2f}" for k, r in t_ratios)
        targets.append(
            f"* Exact / torchopt time: {per_k}; geo-mean {geo:.2f}, worst {worst:.2f} "
            f"(target <= 1.2: **{ok}**)"
        )
    for label in labels:
        if label.endswith(" loop"):
            vec = label[: -len(" loop")]
            vr = [
                (k, ratio(results[(k, vec)].time, results[(k, label)].time))
                for k in ks
                if (k, vec) in results and (k, label) in results
            ]
            vr = [(k, r) for k, r in vr if r is not None]
            if vr:
                per_k = ", ".join(f"K={k}: {r:.2f}" for k, r in vr)
                targets.append(
                    f"* {vec} stage batched (vmap) / same HVPs one by one, time: {per_k} "
                    "(< 1 means vmap is faster)"
                )
    if check:
        parts = ", ".join(f"{lab}: {check[lab]:.1e}" for lab in labels if lab in check)
        targets.append(
            f"* Relative L2 distance of the meta-gradient to torchopt's (1 task, "
            f"K={min(ks)}): {parts} (Exact and Unrolled should be ~1e-6)"
        )
    out += [*targets, ""]
    if notes:
        out += ["Errors:", "", *[f"* {n}" for n in notes], ""]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=["sine", "conv"])
    p.add_argument("--ks", nargs="+", type=int, default=None, help=f"default {DEFAULT_KS}")
    p.add_argument(
        "--rules", nargs="+", type=parse_rule, default=None, help=f"default {DEFAULT_RULES}"
    )
    p.add_argument(
        "--module-rules",
        nargs="*",
        type=parse_rule,
        default=[],
        help="also run the module front end tmg.MetaSGD(..., rule=R) with step(closure)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3)")
    p.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-gradient call")
    p.add_argument(
        "--quick", action="store_true", help="K in {5, 10}, 1 repeat (a couple of minutes)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a small shared machine, OpenMP "
        "threads spinning against other processes make timings erratic)",
    )
    p.add_argument(
        "--max-call-seconds",
        type=float,
        default=120.0,
        help="skip a side at a larger K when its time per call, extrapolated linearly "
        "from the previous K, would exceed this (0: never skip)",
    )
    p.add_argument(
        "--no-vectorize-compare",
        action="store_true",
        help="do not add 'Binomial(L) loop' (vectorize=False) sides",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the live-memory runs")
    p.add_argument("--no-rss", action="store_true", help="skip peak RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    if args.ks is None:
        args.ks = [5, 10] if args.quick else DEFAULT_KS
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rules is None:
        args.rules = [parse_rule(r) for r in DEFAULT_RULES]
    if any(k < 1 for k in args.ks):
        p.error("--ks must be >= 1")
    if args.repeats < 1 or args.meta_batch < 1 or args.threads < 1:
        p.error("--repeats, --meta-batch and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the Markdown report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs: list[RuleSpec] = list(dict.fromkeys(args.rules))
    if not args.no_vectorize_compare:
        specs += [looped for s in specs if (looped := s.looped()) is not None]
    cmd = " ".join(["python benchmarks/bench_rules.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# Meta-gradient rules vs torchopt.MetaSGD (unrolled)", "", machine_info(args), ""]
    lines += [
        "Time: best of the repeats, per call computing the whole meta-batch gradient "
        f"({args.meta_batch} tasks). Peak live: tensor storages alive at once during one "
        "call (LiveMemoryTracker). Peak RSS Δ: peak resident set during a timed call minus "
        "RSS at its start (allocator caching included; coarse). "
        f"Command: `{cmd}`",
        "",
    ]
    t_start = time.perf_counter()
    emitted = 0

    def emit() -> None:
        # print the finished sections as they come, so a long run that dies keeps them
        nonlocal emitted
        sys.stdout.write("\n".join(lines[emitted:]) + "\n")
        sys.stdout.flush()
        emitted = len(lines)
        if args.output:
            with open(args.output, "w") as f:
                f.write("\n".join(lines) + "\n")

    for name in args.models:
        wl = WORKLOADS[name]
        labels, results, check = bench_workload(wl, args, specs)
        lines += report_workload(wl, args, labels, results, check)
        emit()
    lines.append(f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.")
    emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
