"""Dataclass configs built from plain dicts (the workflow's YAML sections), with errors that
name the offending key."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`.

    Nested dataclass fields are built recursively. ``where`` is the dotted path used in messages
    (e.g. ``"pgt"`` gives ``unknown key 'pgt.foo'``).
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {', '.join(repr(prefix + k) for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}" if where else name)
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _is_tuple(hint) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def json_object(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from a ``--options``-style string (empty = ``{}``); errors name ``what``."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, got {text!r}")
    return value


def parse_json_options(text: str | None, cls: type[T], where: str) -> T:
    """Parse a ``--options`` JSON string (as passed by the workflow rules) into ``cls``."""
    if not text:
        return cls()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--options for {where} is not valid JSON: {err}") from err
    return from_dict(cls, data, where)
