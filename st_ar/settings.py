"""Settings of any (nested) dataclass: ``path=value`` changes, rebuilding, and the resume check.

    cfg = apply_settings(preset("debug"), ["train.steps=20", "objective.view=false"])   # RunConfig
    cfg = apply_settings(TokenizerTrainConfig(out="run"), ["steps=600", "lr=1e-3"])       # flat
    changes = parse_settings(DemoConfig, ["steps=1200"])                                  # {"steps": 1200}

A path names a field through nested dataclasses (``section.field``; a flat dataclass takes
``field``). Every value is parsed as the field's annotated type, a name that does not exist is an
error with the closest names, and the rebuilt object runs each dataclass's own ``__post_init__``
checks. ``resume_differences`` is the one rule for what a resumed run may change: each config
declares the paths that may differ (``CHANGEABLE_ON_RESUME``), everything else must match.

No torch here: ``st_ar.config`` and the commands read settings without loading it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse ``raw`` as the annotated type: bool, int, float, str, dict (JSON), list (a JSON list or
    one value), or X | None."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return parse_value(raw, options[0], key)
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"{key} expects {hint.__name__}, got {raw!r}") from None
    if hint is str:
        return raw
    if origin is dict or hint is dict:
        value = _json(raw, key, "a JSON object")
        if not isinstance(value, dict):
            raise ValueError(f"{key} expects a JSON object, got {raw!r}")
        return value
    if origin is list or hint is list:
        if not raw.startswith("["):
            return [raw]  # one item: `overrides=objective.view=false`
        value = _json(raw, key, "a JSON list")
        if not isinstance(value, list):
            raise ValueError(f"{key} expects a JSON list, got {raw!r}")
        return value
    raise ValueError(f"{key}: cannot parse a value of type {hint}")


def _json(raw: str, key: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{key} expects {what}, got {raw!r} ({e})") from None


def field_hint(cls: type, path: str, what: str = "setting") -> Any:
    """The annotated type of the field at dotted ``path`` in dataclass ``cls``; an unknown name is
    refused with the closest names at its level."""
    parts = path.split(".")
    for depth, name in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if name not in names:
            full = [".".join(filter(None, (prefix, n))) for n in names]
            close = difflib.get_close_matches(name, names, n=3)
            if close:
                hint = f"did you mean {', '.join(full[names.index(c)] for c in close)}?"
            else:
                hint = f"known: {', '.join(full)}"
            raise ValueError(f"unknown {what} {path!r}; {hint}")
        hint_type = hints[name]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(hint_type):
            if last:
                fields = ", ".join(f"{path}.{f.name}" for f in dataclasses.fields(hint_type))
                raise ValueError(f"{path!r} is a section, not a setting; set one of its fields: {fields}")
            cls = hint_type
        elif not last:
            raise ValueError(f"unknown {what} {path!r}: {'.'.join(parts[: depth + 1])} has no fields")
    return hint_type


def parse_settings(cls: type, items: list[str], what: str = "setting") -> dict[str, Any]:
    """``["path=value", ...]`` -> {path: typed value} for dataclass ``cls`` (later items win)."""
    changes = {}
    for item in items:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            form = "section.field=value" if any(dataclasses.is_dataclass(h) for h in _hints(cls)) else "field=value"
            raise ValueError(f"{what} {item!r} is not of the form {form}")
        changes[key] = parse_value(raw, field_hint(cls, key, what), key)
    return changes


def _hints(cls: type) -> list[Any]:
    return list(typing.get_type_hints(cls).values())


def apply_settings(obj: Any, items: list[str], what: str = "setting") -> Any:
    """A copy of dataclass ``obj`` with ``path=value`` changes applied and every section re-checked."""
    d = dataclasses.asdict(obj)
    for path, value in parse_settings(type(obj), items, what).items():
        *sections, name = path.split(".")
        target = d
        for section in sections:
            target = target[section]
        target[name] = value
    return build(type(obj), d)


def build(cls: type, d: Mapping[str, Any]) -> Any:
    """Dataclass ``cls`` from a dict (``dataclasses.asdict``'s form); nested sections are built the
    same way, missing fields take their defaults, unknown ones are refused."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}")
    kwargs = {}
    for name, value in d.items():
        section = hints[name]
        kwargs[name] = build(section, value) if dataclasses.is_dataclass(section) else value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- resume


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} through nested dicts (sections, a stored tokenizer config, model.args)."""
    flat = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def with_defaults(stored: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``stored`` (a dataclass ``cls`` as a dict, from a file) with every field it lacks (added
    since it was written) at its default; dict-valued fields are kept as stored."""
    filled = dict(stored)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        if dataclasses.is_dataclass(section) and isinstance(stored.get(f.name), Mapping):
            filled[f.name] = with_defaults(stored[f.name], section)
        elif f.name not in stored:
            filled[f.name] = dataclasses.asdict(section()) if dataclasses.is_dataclass(section) else _default(f)
    return filled


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def resume_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], changeable: Collection[str]
) -> list[tuple[str, Any, Any]]:
    """(path, stored value, current value) for every setting a resumed run may not change but did.

    Both sides are compared path by path (nested dicts by field; a key one side lacks counts as
    None), after a trip through JSON, so tuples and lists compare equal. A path listed in
    ``changeable``, or under one, may differ.
    """
    old, new = flatten(_jsonable(stored)), flatten(_jsonable(current))

    def free(path: str) -> bool:
        return any(path == c or path.startswith(c + ".") for c in changeable)

    paths = sorted(set(old) | set(new))
    return [(p, old.get(p), new.get(p)) for p in paths if not free(p) and old.get(p) != new.get(p)]


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))
