"""Run configs from JSON and flags: typed dataclasses, unknown keys refused, ranges checked.

Both pipelines parse their config with :func:`config_from_dict` before anything is built,
so a misspelt key (``{"trainig": ...}``), a JSON list, or a string where a number belongs
is an error naming the field, never a silent default run. Errors are UsageErrors (ValueErrors
the ``mkfast`` command reports as one line, exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing

from mkfast.errors import UsageError


def check_positive(config, *names: str, strict: bool = True) -> None:
    """Each field ``name`` of ``config`` > 0 (``strict``) or >= 0; the error names the field and its flag."""
    for name in names:
        value = getattr(config, name)
        if not (value > 0 if strict else value >= 0):
            bound = "> 0" if strict else ">= 0"
            raise UsageError(f"{type(config).__name__}: {name} (--{name.replace('_', '-')}) must be {bound}, "
                             f"got {value!r}")


def check_choice(config, name: str, choices) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise UsageError(f"{type(config).__name__}: {name} (--{name.replace('_', '-')}) must be one of "
                         f"{list(choices)}, got {value!r}")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _coerce(kind, value, where: str):
    """``value`` (from JSON) as an instance of annotation ``kind``, or a ValueError naming ``where``."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option in (argument for argument in arguments if argument is not type(None)):
            try:
                return _coerce(option, value, where)
            except UsageError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise UsageError(errors[0])
        raise UsageError(f"{where}: expected {_type_name(kind)}, got {value!r}")
    if dataclasses.is_dataclass(kind):
        return config_from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_coerce(arguments[0], item, f"{where}[{index}]") for index, item in enumerate(value))
        if arguments and len(arguments) != len(value):
            raise UsageError(f"{where}: expected {len(arguments)} values, got {len(value)}")
        return tuple(_coerce(item_kind, item, f"{where}[{index}]")
                     for index, (item_kind, item) in enumerate(zip(arguments, value, strict=True)))
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        return [_coerce(arguments[0], item, f"{where}[{index}]") if arguments else item
                for index, item in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return value
    return value  # an annotation this parser does not know (Any...): taken as it comes


def config_from_dict(cls, values, where: str | None = None, base=None):
    """Dataclass ``cls`` from a (nested) dict: missing keys keep ``base``'s values (default: ``cls()``'s),
    nested dicts update the nested dataclasses field by field, unknown keys and wrong types are refused."""
    where = where or cls.__name__
    if not isinstance(values, dict):
        raise UsageError(f"{where}: expected a JSON object of {cls.__name__} fields, "
                         f"got {type(values).__name__}")
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{where}: unknown field {unknown[0]!r}{hint}; {cls.__name__} has {names}")
    updates = {}
    for key, value in values.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = config_from_dict(type(current), value, f"{where}.{key}", base=current)
        else:
            updates[key] = _coerce(hints[key], value, f"{where}.{key}")
    return dataclasses.replace(base, **updates)


def read_config_file(path: str):
    """The JSON of a config file; errors name the file."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UsageError(f"config file {path} is not valid JSON: {error}") from None


def nest(dotted: dict) -> dict:
    """{"training.steps": 3} -> {"training": {"steps": 3}} (None values, unset flags, left out)."""
    nested: dict = {}
    for name, value in dotted.items():
        if value is None:
            continue
        *sections, attribute = name.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[attribute] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = merge(merged[key], value) if both_dicts else value
    return merged
