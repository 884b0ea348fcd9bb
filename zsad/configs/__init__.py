"""Model profiles as data.

A profile file (``paper.json``, ``tiny.json``) holds one section per method plus an optional ``common`` section
merged into every method of that file, and may ``extends`` another profile. A method's resolved config is

    resolve(parent profile, method)  <-  this profile's common  <-  this profile's method section

(deep merge, later wins). ``build_config`` turns the resulting dict into the method's config dataclass and
rejects unknown or missing keys by name, so a typo in a profile or an override is an error, not a silent default.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from zsad import ZsadError

CONFIG_DIR = Path(__file__).parent


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_profile(profile: str) -> dict:
    path = Path(profile) if profile.endswith(".json") else CONFIG_DIR / f"{profile}.json"
    if not path.is_file():
        raise ZsadError(f"unknown profile '{profile}' (available: {', '.join(available_profiles())}, or a .json path)")
    with open(path) as f:
        return json.load(f)


def resolve_profile(method: str, profile: str) -> dict:
    data = _read_profile(profile)
    resolved: dict = {}
    if "extends" in data:
        resolved = resolve_profile(method, data["extends"])
    elif method not in data:
        raise ZsadError(f"profile '{profile}' has no settings for method '{method}'")
    resolved = deep_merge(resolved, data.get("common", {}))
    return deep_merge(resolved, data.get(method, {}))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_config(cls, data: dict, where: str = "config"):
    """Instantiate dataclass ``cls`` from ``data`` strictly (nested dataclasses recurse)."""
    if not isinstance(data, dict):
        raise ZsadError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ZsadError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ZsadError(f"{where}: missing key '{name}'")
            continue
        hint = hints[name]
        value = data[name]
        if dataclasses.is_dataclass(hint):
            value = build_config(hint, value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
