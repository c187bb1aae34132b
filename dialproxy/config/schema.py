"""The published JSON Schema: loaded once, checked two ways.

``validator()`` is jsonschema's, which words every problem.  ``schema_valid()`` is a yes/no
check compiled from the same file, about 30 times faster: a valid config (the usual case,
and a big one at every reload) is accepted without walking jsonschema's machinery, and only
when it says no does jsonschema run, to report why.  Tests compare the two verdicts on
every single-value change of the shipped configs and on random mutations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sized
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, cast

import jsonschema

SCHEMA_NAME = "aidial.config.schema.json"


@cache
def schema() -> dict[str, Any]:
    """The published schema: the packaged copy, or the repository's when run from source."""
    packaged = resources.files("dialproxy").joinpath("schemas", SCHEMA_NAME)
    if packaged.is_file():
        text = packaged.read_text("utf-8")
    else:
        text = (Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_NAME).read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


@cache
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


# --- a fast yes/no check compiled from the same schema -----------------------------------
#
# jsonschema spends ~60 µs on each key entry: 0.6 s for 10,000 keys.  A valid config (the
# usual case, and every reload) is instead checked by closures compiled from the published
# schema, ~10 times faster; only when they say "invalid" does jsonschema run, to report the
# errors.  The compiler knows the keywords the schema uses, with jsonschema's semantics
# (checked against it in tests/test_loader.py and tests/test_loader_property.py); any other
# keyword makes it give up, and jsonschema then checks every config.

_Check = Callable[[Any], bool]
_IGNORED_KEYWORDS = frozenset(
    {"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"}
    | {"format", "deprecated", "readOnly", "writeOnly", "then", "else"}
)


class _Unsupported(Exception):
    pass


def _is_integer(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, float) and v.is_integer()
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_TYPE_CHECKS: dict[str, _Check] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": _is_integer,
}


def _check_type(arg: Any) -> _Check:
    names = [arg] if isinstance(arg, str) else list(arg)
    if not all(n in _TYPE_CHECKS for n in names):
        raise _Unsupported(f"type {names}")
    kinds = [_TYPE_CHECKS[n] for n in names]
    if len(kinds) == 1:
        return kinds[0]
    return lambda v: any(kind(v) for kind in kinds)


def _check_object(subs: dict[str, _Check], extra: _Check | bool) -> _Check:
    """``properties`` and ``additionalProperties`` (``extra``) in one pass over the object."""

    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return True
        for k, x in v.items():
            sub = subs.get(k)
            if sub is not None:
                if not sub(x):
                    return False
            elif extra is False or (extra is not True and not extra(x)):
                return False
        return True

    return check


def _check_required(names: tuple[str, ...]) -> _Check:
    def check(v: Any) -> bool:
        if isinstance(v, dict):
            for name in names:
                if name not in v:
                    return False
        return True

    return check


def _check_property_names(sub: _Check) -> _Check:
    return lambda v: not isinstance(v, dict) or all(sub(k) for k in v)


def _check_items(sub: _Check) -> _Check:
    def check(v: Any) -> bool:
        if isinstance(v, list):
            for x in v:
                if not sub(x):
                    return False
        return True

    return check


def _check_combined(keyword: str, subs: list[_Check]) -> _Check:
    if keyword == "anyOf":
        return lambda v: any(sub(v) for sub in subs)
    if keyword == "allOf":
        return lambda v: all(sub(v) for sub in subs)
    return lambda v: sum(sub(v) for sub in subs) == 1


def _check_if(cond: _Check, then: _Check, other: _Check) -> _Check:
    return lambda v: then(v) if cond(v) else other(v)


def _check_pattern(regex: re.Pattern[str]) -> _Check:
    return lambda v: not isinstance(v, str) or regex.search(v) is not None


def _check_enum(allowed: frozenset[str]) -> _Check:
    return lambda v: isinstance(v, str) and v in allowed


def _check_size(kind: type[Sized], least: int) -> _Check:
    def check(v: Any) -> bool:
        return not isinstance(v, kind) or len(v) >= least

    return check


def _check_bound(bound: float, upper: bool) -> _Check:
    if upper:
        return lambda v: not _is_number(v) or v <= bound
    return lambda v: not _is_number(v) or v >= bound


def _check_all(checks: list[_Check]) -> _Check:
    if len(checks) == 1:
        return checks[0]

    def check(v: Any) -> bool:
        for one in checks:  # noqa: SIM110 (a loop: faster than all() over a generator)
            if not one(v):
                return False
        return True

    return check


def _compile_node(node: Any, defs: Mapping[str, Any], done: dict[str, _Check]) -> _Check:
    if node is True or node is False:
        answer = bool(node)
        return lambda v: answer
    if not isinstance(node, dict):
        raise _Unsupported(repr(node))
    checks: list[_Check] = []
    for keyword, arg in node.items():
        if keyword in _IGNORED_KEYWORDS:
            continue
        if keyword == "$ref":
            if not (isinstance(arg, str) and arg.startswith("#/$defs/") and arg[8:] in defs):
                raise _Unsupported(str(arg))
            checks.append(_compile_def(arg[8:], defs, done))
        elif keyword == "type":
            checks.append(_check_type(arg))
        elif keyword in ("properties", "additionalProperties"):
            if "patternProperties" in node:
                raise _Unsupported(keyword)
            if keyword == "additionalProperties" and "properties" in node:
                continue  # checked with `properties`
            props = node.get("properties") or {}
            subs = {name: _compile_node(sub, defs, done) for name, sub in props.items()}
            extra = node.get("additionalProperties", True)
            if not isinstance(extra, bool):
                extra = _compile_node(extra, defs, done)
            checks.append(_check_object(subs, extra))
        elif keyword == "required":
            checks.append(_check_required(tuple(arg)))
        elif keyword == "propertyNames":
            checks.append(_check_property_names(_compile_node(arg, defs, done)))
        elif keyword == "items":
            if "prefixItems" in node:
                raise _Unsupported(keyword)
            checks.append(_check_items(_compile_node(arg, defs, done)))
        elif keyword in ("anyOf", "allOf", "oneOf"):
            checks.append(_check_combined(keyword, [_compile_node(x, defs, done) for x in arg]))
        elif keyword == "if":
            checks.append(
                _check_if(
                    _compile_node(arg, defs, done),
                    _compile_node(node.get("then", True), defs, done),
                    _compile_node(node.get("else", True), defs, done),
                )
            )
        elif keyword == "pattern":
            checks.append(_check_pattern(re.compile(arg)))
        elif keyword == "enum":
            if not all(isinstance(e, str) for e in arg):
                raise _Unsupported(keyword)
            checks.append(_check_enum(frozenset(arg)))
        elif keyword in ("minLength", "minItems", "minProperties"):
            kinds: dict[str, type[Sized]] = {
                "minLength": str,
                "minItems": list,
                "minProperties": dict,
            }
            kind = kinds[keyword]
            checks.append(_check_size(kind, int(arg)))
        elif keyword in ("minimum", "maximum"):
            checks.append(_check_bound(arg, keyword == "maximum"))
        else:
            raise _Unsupported(keyword)
    if not checks:
        return lambda v: True
    return _check_all(checks)


def _compile_def(name: str, defs: Mapping[str, Any], done: dict[str, _Check]) -> _Check:
    if name not in done:
        cell: list[_Check] = []
        done[name] = lambda v: cell[0](v)  # a definition that refers to itself
        compiled = _compile_node(defs[name], defs, done)
        cell.append(compiled)
        done[name] = compiled
    return done[name]


@cache
def _fast_check() -> _Check | None:
    """``True`` when a document is valid against the schema; ``None`` if it cannot tell."""
    root = schema()
    try:
        return _compile_node(root, root.get("$defs", {}), {})
    except (_Unsupported, re.error, TypeError, AttributeError):
        return None


def schema_valid(doc: Any) -> bool:
    """Whether ``doc`` is valid against the published schema (fast path, same answer)."""
    check = _fast_check()
    return check(doc) if check is not None else bool(validator().is_valid(doc))


@cache
def def_names() -> dict[int, str]:
    """``id`` of each ``$defs`` entry -> its name, to tell which definition an error is in."""
    return {id(node): name for name, node in schema().get("$defs", {}).items()}
