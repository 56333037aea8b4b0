"""Config value checks: the YAML loader (duplicate keys and syntax errors name the file, line and column) and the
check of every value against its dataclass field's annotation (an error names the dotted key, the value and the
expected form). `training/config.py` composes the run config from these.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Union

import yaml


def is_finite_number(x: Any) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False
    except TypeError:
        return False


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5` and would give a string) and refuses
    a key given twice in one mapping (PyYAML keeps the last one silently). `<<` merge keys may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not key_node.start_mark:
                    raise _DuplicateKeyError(None, None, f"duplicate key {key!r} (first at line {earlier.line + 1}); "
                                             "a key may appear only once in a mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str = "<string>"):
    """YAML `text` -> Python; a syntax error or a duplicate key is a ValueError naming `source` (a file path, or
    the override it came from), the line and the column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        if isinstance(e, _DuplicateKeyError):
            raise ValueError(f"{where}: {e.problem}") from None
        context = ""
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            context = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        elif e.context:
            context = f" ({e.context})"
        raise ValueError(f"{where}: invalid YAML: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: invalid YAML: {e}") from None


# ----------------------------------------------------------------------------- type checks of the values
# Every value is checked against its field's annotation before a dataclass sees it, so a wrong type is an
# error naming the dotted key, the value and the expected form, not a TypeError deep inside __post_init__
# (or a crash at step 1). A list field whose metadata has "items": SomeDataclass (em.phases) has each item
# checked against that dataclass's fields.

_NONE = type(None)
_UNIONS = (Union, types.UnionType)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The field annotations of dataclass `cls`, string annotations (`from __future__ import annotations`)
    resolved."""
    return typing.get_type_hints(cls)


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _annotation_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or (isinstance(tp, type) and not typing.get_args(tp)):
        return tp.__name__
    if typing.get_origin(tp) in _UNIONS:
        return " | ".join(_annotation_name(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_annotation_name(a) for a in args)}]"
    return "None" if tp is _NONE else str(tp)


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings", dict: "mappings"}


def _describe(tp: Any) -> str:
    """How an error message says the form that annotation `tp` wants."""
    if tp is Any:
        return "any value"
    if tp is _NONE:
        return "null"
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer (int)"
    if tp is float:
        return "a finite number (float)"
    if tp is str:
        return "a string (str)"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields (dict)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        parts = [_describe(a) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if tp is list or origin is list:
        item = args[0] if args else Any
        items = f"{item.__name__} mappings" if dataclasses.is_dataclass(item) else _PLURALS.get(item, "values")
        return f"a list of {items} ({_annotation_name(tp)})"
    if tp is dict or origin is dict:
        return f"a mapping ({_annotation_name(tp)})"
    return f"a {_annotation_name(tp)}"


def _mismatch(key: str, value: Any, tp: Any) -> ValueError:
    return ValueError(f"{key}={short_repr(value)}: expected {_describe(tp)}, got {_type_name(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_kind(value: Any, tp: Any) -> bool:
    """Whether `value` has the outer shape of `tp` (a list for a list, a number for a float, ...), so that a
    union member's own error says more than the union's."""
    origin = typing.get_origin(tp)
    if tp is list or origin is list:
        return isinstance(value, (list, tuple))
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is float:
        return _is_number(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return False


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """`value` checked against annotation `tp`; returns it, with ints made floats where a float is wanted and
    tuples made lists. Raises ValueError naming `key`, the value and the expected form."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        for member in args:
            try:
                return _check_value(key, value, member)
            except ValueError:
                pass
        near = [m for m in args if _same_kind(value, m)]
        if len(near) == 1:
            return _check_value(key, value, near[0])  # raises that member's more precise error
        raise _mismatch(key, value, tp)
    if tp is _NONE:
        if value is None:
            return None
        raise _mismatch(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, value, tp)
    if tp is float:
        if not _is_number(value):
            raise _mismatch(key, value, tp)
        if not is_finite_number(value):
            raise ValueError(f"{key}={short_repr(value)}: must be a finite number (float), not inf or nan")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _mismatch(key, value, tp)
        return check_fields(value, tp, key)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, value, tp)
        item = args[0] if args else Any
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(key, value, tp)
        if not args:
            return value
        return {_check_value(f"{key} (a key)", k, args[0]): _check_value(f"{key}.{k}", v, args[1])
                for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(key, value, tp)
    return value  # an annotation this checker does not model: the dataclass's own checks apply


def _with_items(tp: Any, item: type) -> Any:
    """`tp` with the item type of its list (or of the list member of its union) replaced by `item`."""
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return functools.reduce(lambda a, b: a | b, [_with_items(a, item) for a in typing.get_args(tp)])
    if tp is list or origin is list:
        return list[item]
    return tp


def check_fields(values: dict, cls: type, prefix: str) -> dict:
    """The mapping `values` for dataclass `cls` with every value checked against its field's annotation."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if name not in fields:
            raise ValueError(f"unknown config key {key!r}; allowed keys in {prefix}: {sorted(fields)}")
        tp = hints[name]
        if "items" in fields[name].metadata:
            tp = _with_items(tp, fields[name].metadata["items"])
        out[name] = _check_value(key, value, tp)
    return out
