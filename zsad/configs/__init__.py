"""Model profiles as data.

A profile file (``paper.json``, ``tiny.json``) holds one section per method, an optional ``common`` section merged
into every method (only keys every method has: ``backbone``, ``train``), and may ``extends`` another profile. A
method section may say ``"inherit": "<other method>"`` to start from that method's section (BAG-CLIP inherits
AnomalyCLIP). For each profile in the ``extends`` chain, root first, the resolved config is updated with

    that profile's common  <-  its sections along the inherit chain (ancestor first)  <-  its section of the method

(deep merge, later wins). ``build_config`` turns the result into the method's config dataclass and rejects
unknown or missing keys by name, so a typo in a profile or an override is an error, not a silent default.
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


def _profile_chain(profile: str) -> list[dict]:
    chain = [_read_profile(profile)]
    while "extends" in chain[0]:
        chain.insert(0, _read_profile(chain[0]["extends"]))
    return chain


def _inherit_chain(chain: list[dict], method: str) -> list[str]:
    """[ancestor, ..., method] following "inherit" keys (declared in any profile of the chain)."""
    out = [method]
    while True:
        parent = next((d[out[0]]["inherit"] for d in reversed(chain) if "inherit" in d.get(out[0], {})), None)
        if parent is None:
            return out
        if parent in out:
            raise ZsadError(f"profile inheritance loop: {' <- '.join([parent] + out)}")
        out.insert(0, parent)


def resolve_profile(method: str, profile: str) -> dict:
    chain = _profile_chain(profile)
    if not any(method in d for d in chain):
        raise ZsadError(f"profile '{profile}' has no settings for method '{method}'")
    resolved: dict = {}
    for data in chain:
        resolved = deep_merge(resolved, data.get("common", {}))
        for name in _inherit_chain(chain, method):
            section = {k: v for k, v in data.get(name, {}).items() if k != "inherit"}
            resolved = deep_merge(resolved, section)
    return resolved


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
