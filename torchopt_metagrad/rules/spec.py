"""Rule specs: one string grammar for a rule and its knobs, ``name[:knob=value,...]``.

``binomial:order=2``, ``implicit_cg:reg=1,maxiter=5``, ``adjoint:backward=odeint``.
``name`` is a name of the registry (:func:`~torchopt_metagrad.available_rules`); the
knobs are the rule class's dataclass fields, and each value is converted to the
field's annotated type: ``int``, ``float``, ``bool`` (``true``/``false``, ``1``/``0``,
``yes``/``no``), ``str``, ``None`` (written ``none``) in an optional type, a
``Literal``, unions (tried in the order dataclass, bool, int, float, others, str), and
frozen dataclasses, written nested as their lower-case class name with their own
fields: ``adjoint:solver=ode(method=rk4,step_size=0.01)``. Items are split at
top-level commas only, so nested values may hold commas.

Nothing here names a rule: a rule registered anywhere is usable from every command
line that takes a spec. :func:`format_rule` is the inverse of :func:`parse_rule`: it
writes the knobs that differ from their defaults, in field order, and
``parse_rule(format_rule(r)) == r``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints

from torchopt_metagrad.rules.base import AbstractRule, available_rules, rule_class

__all__ = ["format_rule", "parse_rule", "parse_rule_spec", "rule_knobs"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def rule_knobs(rule: str | type[AbstractRule]) -> dict[str, Any]:
    """The knobs of a rule: ``{field name: annotated type}``, in field order.

    Args:
        rule: a registered name (``"binomial"``) or a rule class.

    Raises:
        ValueError: ``rule`` is not a registered name (the message lists them).
        TypeError: the field annotations cannot be resolved (they name classes of a
            local scope).
    """
    cls = rule_class(rule) if isinstance(rule, str) else rule
    return _field_types(cls)


def parse_rule_spec(
    text: str,
    *,
    extra_keys: Mapping[str, Any] | None = None,
    extra_names: Collection[str] = (),
) -> tuple[str, dict[str, Any]]:
    """Split ``name[:knob=value,...]`` into the name and its knobs, converted; build nothing.

    For callers that add keys of their own (a recipe's ``steps=``, ``label=``) or
    names that are not rules (an outer direction such as ``reptile``).

    Args:
        text: the spec.
        extra_keys: the caller's own keys and their types, accepted beside the rule's
            knobs, converted the same way and returned in the same dict (a rule knob of
            the same name is an error).
        extra_names: names the caller handles that are not registered rules; they
            take only ``extra_keys``.

    Returns:
        ``(name, {key: value})``, keys in the order given.

    Raises:
        ValueError: an unknown name or key, a badly formed item, a key given twice, or
            a value that does not convert; the message names the rule and the key and
            lists the valid ones.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a rule spec is 'name[:knob=value,...]', got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    extra = dict(extra_keys or {})
    if name in extra_names:
        knob_types: dict[str, Any] = {}
    else:
        if name not in available_rules():
            valid = ", ".join([*available_rules(), *extra_names])
            raise ValueError(f"unknown rule {name!r}; available: {valid}")
        knob_types = rule_knobs(name)
        clash = sorted(set(knob_types) & set(extra))
        if clash:
            raise ValueError(f"rule {name!r}: knob {clash[0]!r} collides with a key of the caller")
    types_ = {**knob_types, **extra}
    where = f"rule {name!r}"
    return name, _parse_items(rest, types_, where, "knob")


def parse_rule(text: str) -> AbstractRule:
    """The rule a spec describes: ``parse_rule("binomial:order=2") == tmg.Binomial(2)``.

    Raises:
        ValueError: a bad spec (see :func:`parse_rule_spec`), a required knob left out,
            or knob values the rule rejects (its own message, prefixed with its name).
    """
    name, knobs = parse_rule_spec(text)
    cls = rule_class(name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and _default(f) is dataclasses.MISSING and f.name not in knobs
    ]
    if missing:
        example = ",".join(f"{m}=..." for m in missing)
        raise ValueError(f"rule {name!r} needs knob {missing[0]!r} (e.g. {name}:{example})")
    try:
        return cls(**knobs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"rule {name!r}: {err}") from err


def format_rule(rule: AbstractRule) -> str:
    """The spec of a registered rule: its name, then the knobs that differ from the defaults.

    Required knobs are always written; the others in field order when they differ
    from their defaults. Floats are written short (``0.003``, ``1e-06``, ``1`` for 1.0)
    but exactly: ``parse_rule(format_rule(rule)) == rule``.

    Raises:
        ValueError: ``rule``'s class is not the one registered under its name, or a
            knob value cannot be written (a string holding ``,()=:``).
    """
    cls = type(rule)
    name = getattr(cls, "name", "")
    if name not in available_rules() or rule_class(name) is not cls:
        raise ValueError(f"{cls.__name__} is not a registered rule; register it with tmg.register")
    items = _format_fields(rule, f"rule {name!r}")
    return name + (":" + ",".join(items) if items else "")


# ----------------------------------------------------------------------------- parsing
def _field_types(cls: type) -> dict[str, Any]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    try:
        hints = get_type_hints(cls)
    except NameError:  # string annotations naming something only a local scope knows
        if any(isinstance(f.type, str) for f in fields):
            raise TypeError(
                f"the knob types of {cls.__name__} cannot be resolved (annotations naming "
                "local classes); define it and its knob types at module level"
            ) from None
        return {f.name: f.type for f in fields}
    return {f.name: hints[f.name] for f in fields}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _split_top_level(text: str, where: str) -> list[str]:
    """Split at commas outside parentheses; empty items are dropped."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{where}: unbalanced ')' in {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"{where}: unbalanced '(' in {text!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _parse_items(text: str, types_: Mapping[str, Any], where: str, kind: str) -> dict[str, Any]:
    valid = ", ".join(types_) or "none"
    out: dict[str, Any] = {}
    for item in _split_top_level(text, where):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"{where}: expected {kind}=value, got {item!r}; {kind}s: {valid}")
        if key not in types_:
            raise ValueError(f"{where} has no {kind} {key!r}; {kind}s: {valid}")
        if key in out:
            raise ValueError(f"{where}: {kind} {key!r} given twice")
        out[key] = _convert(types_[key], value.strip(), f"{where}, {kind} {key!r}")
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_order(tp: Any) -> int:
    if _is_dataclass_type(tp):
        return 0
    ranks = {bool: 1, int: 2, float: 3, str: 5}
    return ranks.get(tp, 4)


def _type_name(tp: Any) -> str:
    if _is_dataclass_type(tp):
        return f"{tp.__name__.lower()}(...)"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, text: str, where: str) -> Any:
    """``text`` as a value of type ``tp``; ``ValueError`` naming ``where`` otherwise."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        members = get_args(tp)
        if type(None) in members and text.lower() == "none":
            return None
        for member in sorted((m for m in members if m is not type(None)), key=_union_order):
            if _is_dataclass_type(member) and _tag_of(text) == member.__name__.lower():
                return _convert_dataclass(member, text, where)  # its own error, no fallback
            try:
                return _convert(member, text, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {text!r}")
    if tp is type(None):
        if text.lower() == "none":
            return None
    elif get_origin(tp) is Literal:
        for choice in get_args(tp):
            if text == str(choice):
                return choice
    elif _is_dataclass_type(tp):
        return _convert_dataclass(tp, text, where)
    elif tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif tp is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif tp is float:
        try:
            return float(text)
        except ValueError:
            pass
    elif tp is str or tp is Any:
        return text
    else:
        try:
            return tp(text)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {text!r}")


def _tag_of(text: str) -> str | None:
    head, paren, _ = text.partition("(")
    return head.strip() if paren else None


def _convert_dataclass(tp: type, text: str, where: str) -> Any:
    tag = tp.__name__.lower()
    _, _, rest = text.partition("(")
    if _tag_of(text) != tag or not rest.rstrip().endswith(")"):
        raise ValueError(f"{where}: expected {tag}(field=value,...), got {text!r}")
    fields = _field_types(tp)
    values = _parse_items(rest.rstrip()[:-1], fields, f"{where}: {tag}", "field")
    try:
        return tp(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


# -------------------------------------------------------------------------- formatting
def _format_fields(obj: Any, where: str) -> list[str]:
    items = []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value, default = getattr(obj, f.name), _default(f)
        if default is dataclasses.MISSING or value != default:
            items.append(f"{f.name}={_format_value(value, f'{where}, knob {f.name!r}')}")
    return items


def _format_value(value: Any, where: str) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if _is_dataclass_type(type(value)):
        inner = _format_fields(value, where)
        return f"{type(value).__name__.lower()}({','.join(inner)})"
    text = str(value)
    if not text or any(c in text for c in ",()=:") or text.lower() == "none":
        raise ValueError(f"{where}: the value {text!r} cannot be written in a rule spec")
    return text
