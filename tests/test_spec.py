"""Rule specs: ``parse_rule`` builds what direct construction builds, ``format_rule`` is its
inverse for every registered rule, knob types come from the dataclass fields (nested
frozen dataclasses included), and errors name the rule, the knob and what is valid."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pytest
import torch

import torchopt_metagrad as tmg
from torchopt_metagrad.rules import base

# --- a rule with a nested frozen-dataclass knob, like Adjoint(solver=tmg.ODE(...)) -----


@dataclasses.dataclass(frozen=True)
class ODE:
    """Stands in for ``tmg.ODE``: an integrator's settings."""

    method: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    max_steps: int = 10000

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclasses.dataclass(frozen=True)
class SolverRule(tmg.FlowRule):
    """A rule whose ``solver`` knob is an ``ODE``, a method name, or ``None``."""

    solver: ODE | str | None = None
    reintegrate: bool = False
    backward: Literal["heun", "odeint"] = "heun"

    def meta_gradient(self, jac: Any, g: torch.Tensor) -> torch.Tensor:
        return g


NESTED = "spec_test_nested_solver_rule"


@pytest.fixture
def nested_rule(monkeypatch: pytest.MonkeyPatch) -> type[SolverRule]:
    """``SolverRule`` registered for this test only (the registry is restored after it)."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return tmg.register(NESTED)(SolverRule)


# --- every registered rule ---------------------------------------------------------------

EXAMPLES = [
    ("first_order", tmg.FirstOrder()),
    ("exact", tmg.Exact()),
    ("unrolled", tmg.Unrolled()),
    ("truncated:order=2", tmg.Truncated(2)),
    ("binomial:order=2", tmg.Binomial(2)),
    ("binomial: order = 1 , vectorize=False", tmg.Binomial(1, vectorize=False)),
    ("binomial:order=3,chunk_size=4", tmg.Binomial(3, chunk_size=4)),
    ("binomial:order=3,chunk-size=none", tmg.Binomial(3)),
    ("binomial:order=2,check=false", tmg.Binomial(2, check=False)),
    ("binomial:order=auto", tmg.Binomial("auto")),
    ("binomial:order=auto,tol=1e-4,max_order=3,chunk_size=2",
     tmg.Binomial("auto", tol=1e-4, max_order=3, chunk_size=2)),
    ("implicit_cg:reg=1,maxiter=5", tmg.ImplicitCG(1.0, maxiter=5)),
    ("implicit_cg:reg=0.5,tol=1e-10", tmg.ImplicitCG(0.5, tol=1e-10)),
    ("adjoint", tmg.Adjoint()),
    ("adjoint:solver=heun", tmg.Adjoint(solver="heun")),
    ("adjoint:solver=ode(method=rk4,step_size=0.01)",
     tmg.Adjoint(solver=tmg.ODE("rk4", step_size=0.01))),
    ("adjoint:solver=ode(rtol=1e-5,atol=1e-7),reintegrate=true",
     tmg.Adjoint(solver=tmg.ODE(rtol=1e-5, atol=1e-7), reintegrate=True)),
    ("implicit_neumann:reg=10,terms=50", tmg.ImplicitNeumann(10.0, terms=50)),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_parse_rule_equals_direct_construction(text, expected):
    rule = tmg.parse_rule(text)
    assert type(rule) is type(expected) and rule == expected
    assert tmg.parse_rule(tmg.format_rule(rule)) == expected


def _variants(cls: type[tmg.AbstractRule]) -> list[dict[str, Any]]:
    """Knob sets for ``cls``: the required knobs alone, then each other knob changed."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    types = tmg.rule_knobs(cls)

    def changed(tp: Any, default: Any) -> Any:
        if tp is bool:
            return not default
        if tp is int:
            return 1 if default is dataclasses.MISSING else default + 1
        if tp is float:
            return 0.75 if default is dataclasses.MISSING else default * 3
        if tp == int | None:
            return 3
        if tp == float | None:
            return 0.125
        if tp == int | Literal["auto"]:  # Binomial's order: a fixed one
            return 1
        return None

    required = {
        f.name: changed(types[f.name], dataclasses.MISSING)
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    out = [required]
    for f in fields:
        if f.name not in required:
            value = changed(types[f.name], f.default)
            if value is not None:
                out.append({**required, f.name: value})
    return out


@pytest.mark.parametrize("name", tmg.available_rules())
def test_format_rule_is_the_inverse_of_parse_rule(name):
    cls = tmg.rule_class(name)
    checked = 0
    for knobs in _variants(cls):
        try:
            rule = cls(**knobs)
        except ValueError:  # a value the rule rejects: not a rule to write down
            continue
        text = tmg.format_rule(rule)
        assert text.split(":")[0] == name
        assert tmg.parse_rule(text) == rule, text
        assert tmg.parse_rule_spec(text) == (name, {k: v for k, v in knobs.items()})
        checked += 1
    assert checked >= 1


def test_format_rule_writes_changed_knobs_in_field_order():
    assert tmg.format_rule(tmg.Exact()) == "exact"
    assert tmg.format_rule(tmg.Binomial(2)) == "binomial:order=2"
    assert tmg.format_rule(tmg.Binomial(2, vectorize=False, chunk_size=4)) == (
        "binomial:order=2,chunk_size=4,vectorize=false"
    )
    assert tmg.format_rule(tmg.ImplicitCG(1.0)) == "implicit_cg:reg=1"  # required: always
    assert tmg.format_rule(tmg.ImplicitCG(2.0, maxiter=20)) == "implicit_cg:reg=2"
    assert tmg.format_rule(tmg.Adjoint(solver=tmg.ODE("rk4", step_size=0.01))) == (
        "adjoint:solver=ode(method=rk4,step_size=0.01)"
    )


@pytest.mark.parametrize("reg", [0.1, 1 / 3, 1e-300, 2.5e10, 1e20, 3.0, 1e-6, 123456.789])
def test_floats_are_written_short_and_exact(reg):
    text = tmg.format_rule(tmg.ImplicitCG(reg))
    assert float(text.split("=")[1]) == reg
    assert tmg.parse_rule(text) == tmg.ImplicitCG(reg)
    if reg in (0.1, 3.0, 1e-6):
        assert text.split("=")[1] == {0.1: "0.1", 3.0: "3", 1e-6: "1e-06"}[reg]


def test_rule_knobs_are_the_dataclass_fields_with_their_types():
    assert tmg.rule_knobs("binomial") == {
        "order": int | Literal["auto"],
        "chunk_size": int | None,
        "vectorize": bool,
        "check": bool,
        "tol": float,
        "max_order": int,
        "memory": int | Literal["auto"] | None,
        "hessian_scale": Literal["paper", "code"],
    }
    assert tmg.rule_knobs(tmg.ImplicitCG) == {
        "reg": float,
        "maxiter": int,
        "tol": float,
        "solver": Literal["minres", "cg", "normal_cg"],
        "x0": Literal["zero", "rhs"],
        "inner_tol": float | None,
    }
    assert tmg.rule_knobs("exact") == {"snapshots": int | None, "keep_graphs": int}
    assert tmg.rule_knobs("first_order") == {}


def test_parse_rule_spec_converts_without_building():
    assert tmg.parse_rule_spec("binomial:order=-1") == ("binomial", {"order": -1})
    assert tmg.parse_rule_spec("implicit_cg") == ("implicit_cg", {})  # reg missing: not checked
    name, knobs = tmg.parse_rule_spec("binomial:vectorize=NO,order=2")
    assert name == "binomial" and knobs == {"vectorize": False, "order": 2}
    assert list(knobs) == ["vectorize", "order"]  # the order given
    for text, value in [("true", True), ("1", True), ("yes", True), ("False", False), ("0", False)]:
        assert tmg.parse_rule_spec(f"binomial:vectorize={text}")[1]["vectorize"] is value
    assert tmg.parse_rule_spec("adjoint:solver=None")[1] == {"solver": None}
    assert isinstance(tmg.parse_rule_spec("implicit_cg:reg=2")[1]["reg"], float)


def test_parse_rule_spec_with_the_callers_keys_and_names():
    extra = {"steps": int, "label": str}
    assert tmg.parse_rule_spec("binomial:order=2,steps=3,label=B2", extra_keys=extra) == (
        "binomial",
        {"order": 2, "steps": 3, "label": "B2"},
    )
    assert tmg.parse_rule_spec("reptile:steps=4", extra_keys=extra, extra_names={"reptile"}) == (
        "reptile",
        {"steps": 4},
    )
    with pytest.raises(ValueError, match=r"'reptile' has no knob 'order'; knobs: steps, label"):
        tmg.parse_rule_spec("reptile:order=1", extra_keys=extra, extra_names={"reptile"})
    with pytest.raises(ValueError, match=r"unknown rule 'nope'; available: .*binomial.*reptile"):
        tmg.parse_rule_spec("nope", extra_names={"reptile"})
    with pytest.raises(ValueError, match="knob 'order' collides"):
        tmg.parse_rule_spec("binomial:order=1", extra_keys={"order": int})
    with pytest.raises(ValueError, match=r"rule 'binomial', knob 'steps': expected int"):
        tmg.parse_rule_spec("binomial:order=1,steps=many", extra_keys=extra)


ERRORS = [
    ("", r"a rule spec is 'name\[:knob=value,...\]'"),
    ("nope:order=1", r"unknown rule 'nope'; available: .*binomial.*implicit_cg"),
    ("Binomial:order=1", r"unknown rule 'Binomial'; available: "),
    ("binomial:oder=2", r"rule 'binomial' has no knob 'oder'; knobs: order, chunk_size, vectorize"),
    ("binomial:2", r"rule 'binomial': expected knob=value, got '2'; knobs: order, chunk_size"),
    ("binomial:order=two", r"rule 'binomial', knob 'order': expected int \| 'auto', got 'two'"),
    ("binomial:order=1.5", r"rule 'binomial', knob 'order': expected int \| 'auto', got '1.5'"),
    ("binomial:order=2,tol=1e-4", r"rule 'binomial': tol applies to order='auto' only"),
    ("binomial:order=auto,check=false", r"rule 'binomial': check=False applies to a fixed"),
    ("binomial:order=auto,tol=2", r"rule 'binomial': tol must be in \(0, 1\), got 2"),
    ("binomial:order=auto,max_order=0", r"rule 'binomial': max_order must be >= 1, got 0"),
    ("binomial:order=1,vectorize=maybe", r"knob 'vectorize': expected bool, got 'maybe'"),
    ("binomial:order=1,chunk_size=x", r"knob 'chunk_size': expected int \| none, got 'x'"),
    ("binomial:order=1,order=2", r"rule 'binomial': knob 'order' given twice"),
    ("binomial", r"rule 'binomial' needs knob 'order' \(e.g. binomial:order=...\)"),
    ("implicit_cg:maxiter=3", r"rule 'implicit_cg' needs knob 'reg'"),
    ("binomial:order=-1", r"rule 'binomial': order must be >= 0, got -1"),
    ("implicit_cg:reg=0", r"rule 'implicit_cg': reg must be"),
    ("adjoint:solver=ode(method=nope)", r"rule 'adjoint'.*nope"),
    ("binomial:order=(1", r"rule 'binomial': unbalanced '\('"),
    ("binomial:order=1)", r"rule 'binomial': unbalanced '\)'"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[t or "empty" for t, _ in ERRORS])
def test_errors_name_the_rule_the_knob_and_what_is_valid(text, message):
    with pytest.raises(ValueError, match=message):
        tmg.parse_rule(text)


def test_format_rule_refuses_what_it_cannot_write(nested_rule):
    @dataclasses.dataclass(frozen=True)
    class Unregistered(tmg.Exact):
        pass

    with pytest.raises(ValueError, match="Unregistered is not a registered rule"):
        tmg.format_rule(Unregistered())
    with pytest.raises(ValueError, match=r"knob 'solver'.*'a,b' cannot be written"):
        tmg.format_rule(nested_rule(solver="a,b"))


# --- nested frozen dataclasses ---------------------------------------------------------


def test_nested_dataclass_knob_parses_like_direct_construction(nested_rule):
    text = f"{NESTED}:solver=ode(method=rk4,step_size=0.01),reintegrate=true"
    expected = nested_rule(solver=ODE(method="rk4", step_size=0.01), reintegrate=True)
    assert tmg.parse_rule(text) == expected
    assert tmg.format_rule(expected) == text
    assert tmg.parse_rule_spec(text) == (
        NESTED,
        {"solver": ODE(method="rk4", step_size=0.01), "reintegrate": True},
    )
    # the union's other members, and the nested defaults
    assert tmg.parse_rule(f"{NESTED}:solver=rk4").solver == "rk4"
    assert tmg.parse_rule(f"{NESTED}:solver=none").solver is None
    assert tmg.parse_rule(f"{NESTED}:solver=ode()").solver == ODE()
    assert tmg.parse_rule(f"{NESTED}: solver = ode( rtol=1e-3 , atol = none )").solver == ODE(
        rtol=1e-3
    )
    assert tmg.parse_rule(f"{NESTED}:backward=odeint").backward == "odeint"


@pytest.mark.parametrize(
    "rule",
    [
        SolverRule(),
        SolverRule(solver=ODE()),
        SolverRule(solver=ODE(method="rk4", step_size=0.01, max_steps=50)),
        SolverRule(solver=ODE(rtol=1e-9, atol=1 / 3), reintegrate=True, backward="odeint"),
        SolverRule(solver="euler"),
    ],
    ids=repr,
)
def test_nested_dataclass_knob_round_trips(nested_rule, rule):
    assert tmg.parse_rule(tmg.format_rule(rule)) == rule


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ("solver=ode(method=rk4,nope=1)",
         rf"rule '{NESTED}', knob 'solver': ode has no field 'nope'; fields: method, rtol, atol"),
        ("solver=ode(max_steps=many)",
         rf"rule '{NESTED}', knob 'solver': ode, field 'max_steps': expected int, got 'many'"),
        ("solver=ode(max_steps=0)",
         rf"rule '{NESTED}', knob 'solver': max_steps must be >= 1, got 0"),
        ("solver=ode(method=rk4", rf"rule '{NESTED}': unbalanced '\('"),
        ("backward=reverse", r"knob 'backward': expected 'heun' \| 'odeint', got 'reverse'"),
        ("reintegrate=ode()", rf"rule '{NESTED}', knob 'reintegrate': expected bool"),
    ],
)  # fmt: skip
def test_nested_dataclass_errors(nested_rule, knobs, message):
    with pytest.raises(ValueError, match=message):
        tmg.parse_rule(f"{NESTED}:{knobs}")


def test_the_test_rule_is_gone_after_its_test():
    assert NESTED not in tmg.available_rules()


def test_knob_types_that_cannot_be_resolved_are_a_clear_error():
    @dataclasses.dataclass(frozen=True)
    class LocalSettings:
        steps: int = 1

    @dataclasses.dataclass(frozen=True)
    class LocalRule(tmg.Exact):
        settings: LocalSettings | None = None  # a string naming a class of this scope only

    with pytest.raises(TypeError, match="knob types of LocalRule cannot be resolved"):
        tmg.rule_knobs(LocalRule)
