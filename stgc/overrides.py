"""``section.key=value`` overrides of a ``RunConfig`` from the command line (``apply_overrides``): each
value converted to its field's type, method presets and objective lists, router / bank switches, and
ValueError listing the valid keys for an unknown one."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from stgc.config import EXPERTS_CONFIGS, ROUTER_CONFIGS, ExpertsConfig, RouterConfig
from stgc.objectives.config import METHODS, OBJECTIVE_CONFIGS, ObjectiveConfig
from stgc.run_config import RunConfig


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``config`` with ``section.key=value`` overrides applied, e.g. ``training.lr=1e-4``,
    ``model.moe.num_experts=8``, ``output_dir=runs/x``, and for the method:

    - ``method.name=stgc``: the preset (its objectives with their defaults, and its MoE changes), applied
      before the other keys; with ``method.objectives`` given too, ``method.name`` is only the label;
    - ``method.objectives=load_balance,z_loss``: the objective list (objectives already in the method
      keep their settings; the label becomes the list's names after load_balance, joined by '+');
    - ``method.stgc.beta=0.05``: a setting of one objective; ``method.beta=0.05`` (the older form) sets it
      on the one objective that has such a setting;
    - ``model.moe.router.name=...`` / ``model.moe.experts.name=...``: a router or bank switch (its other
      settings reset to that one's defaults), applied before their other keys.

    Values convert to the field's type: numbers, ``true`` / ``false``, ``none`` / ``null`` for optional
    fields, comma-separated or ``[0,2]`` lists for tuples. An unknown key or a malformed value raises
    ValueError listing the valid keys; the result is validated like any config."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. training.lr=1e-4).")
        pairs.append((key, value.strip()))
    given = dict(pairs)
    if "method.name" in given and "method.objectives" not in given:
        name = given["method.name"]
        if name not in METHODS:
            raise ValueError(f"method.name={name!r} is unknown; valid methods are {sorted(METHODS)}.")
        if name != config.method.name:
            from stgc.recipes import with_method  # recipes re-exports this module's apply_overrides

            config = with_method(config, name)
    data = config.to_dict()
    if "method.objectives" in given:
        data["method"] = _objective_list(data["method"], given["method.objectives"], given.get("method.name"))
    # registry switches first, so that the other keys are checked against the new class's fields
    for key in ("model.moe.router.name", "model.moe.experts.name"):
        if key in given:
            section = data["model"]["moe"][key.split(".")[2]]
            if given[key] != section.get("name"):
                section.clear()
                section["name"] = given[key]
    for key, value in pairs:
        if key in ("method.name", "method.objectives", "model.moe.router.name", "model.moe.experts.name"):
            continue
        if key.startswith("method."):
            _set_objective(data["method"], key, value)
        else:
            _set_path(data, key.split("."), value, RunConfig, key)
    return RunConfig.from_dict(data)


def _objective_list(method: dict[str, Any], text: str, label: str | None) -> dict[str, Any]:
    names = [n.strip() for n in text.strip("[]()").split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVE_CONFIGS]
    if not names or unknown:
        raise ValueError(
            f"method.objectives={text!r} names unknown objectives {unknown or '(none given)'}; valid "
            f"objectives are {sorted(OBJECTIVE_CONFIGS)}."
        )
    old = {o["name"]: o for o in method["objectives"]}
    rest = [n for n in names if n != "load_balance"]
    return {
        "name": label or ("+".join(rest) if rest else "baseline"),
        "objectives": [old.get(n, {"name": n}) for n in names],
    }


def _set_objective(method: dict[str, Any], key: str, text: str) -> None:
    """``method.<objective>.<setting>=`` or ``method.<setting>=`` (the one objective that has it)."""
    path = key.split(".")[1:]
    objectives = method["objectives"]
    if len(path) == 2:
        target = next((o for o in objectives if o["name"] == path[0]), None)
        if target is None:
            raise ValueError(
                f"config key {key!r}: the method has no objective {path[0]!r} (it has "
                f"{[o['name'] for o in objectives]}); add it with method.objectives=..."
            )
        _set_path(target, path[1:], text, OBJECTIVE_CONFIGS[target["name"]], key)
        return
    owners = [o for o in objectives if path[0] in _field_hints(OBJECTIVE_CONFIGS[o["name"]], o)]
    if len(path) != 1 or len(owners) != 1 or path[0] == "name":
        valid = sorted(
            f"method.{o['name']}.{f}"
            for o in objectives
            for f in _field_hints(OBJECTIVE_CONFIGS[o["name"]], o)
            if f != "name"
        )
        raise ValueError(
            f"unknown config key {key!r}; the method {method['name']!r} has the objectives "
            f"{[o['name'] for o in objectives]}, whose keys are {valid} (and method.name, "
            "method.objectives)."
        )
    _set_path(owners[0], path, text, OBJECTIVE_CONFIGS[owners[0]["name"]], key)


def _field_hints(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    # registry sections: the class depends on the section's name
    if isinstance(cls, type) and issubclass(cls, RouterConfig):
        cls = ROUTER_CONFIGS.get(data.get("name"), cls)
    elif isinstance(cls, type) and issubclass(cls, ExpertsConfig):
        cls = EXPERTS_CONFIGS.get(data.get("name"), cls)
    elif isinstance(cls, type) and issubclass(cls, ObjectiveConfig):
        cls = OBJECTIVE_CONFIGS.get(data.get("name"), cls)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set_path(data: dict[str, Any], path: list[str], text: str, cls: type, full_key: str) -> None:
    hints = _field_hints(cls, data)
    head = path[0]
    if head not in hints or head == "method":
        prefix = full_key[: len(full_key) - len(".".join(path))]
        valid = sorted(prefix + k for k in hints)
        raise ValueError(f"unknown config key {full_key!r}; valid keys here are {valid}.")
    hint = hints[head]
    if len(path) > 1:
        sub = data.get(head)
        if not (isinstance(sub, dict) and dataclasses.is_dataclass(hint)):
            raise ValueError(f"config key {full_key!r}: {head!r} is a value, not a section.")
        _set_path(sub, path[1:], text, hint, full_key)
        return
    if dataclasses.is_dataclass(hint):
        keys = sorted(f"{full_key}.{f}" for f in _field_hints(hint, data.get(head) or {}))
        raise ValueError(f"config key {full_key!r} is a section; set one of its keys: {keys}.")
    data[head] = _convert(text, hint, full_key)


def _convert(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float, bool, str, tuple[int, ...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(hint)):
            return None
        errors = []
        for arg in args:
            try:
                return _convert(text, arg, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={text!r} is not a boolean; use true or false.")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not an integer.") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not a number.") from None
    if hint is str:
        return text
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
        return tuple(_convert(p, item, key) for p in parts)
    raise ValueError(f"{key}: values of type {hint} cannot be set from the command line.")
