"""Method registry: ``create(name, profile, **overrides)`` builds a method from a profile in zsad/configs/.

Overrides deep-merge into the resolved profile, e.g. ``create("bagclip", "tiny", graph={"knn_k": 4})`` or
``create("anomalyclip", "paper", backbone={"weights": "clip.safetensors"})``.
"""
from __future__ import annotations

import torch

from zsad import ZsadError
from zsad.configs import build_config, deep_merge, resolve_profile
from zsad.methods.afclip import AfClip
from zsad.methods.anomalyclip import AnomalyClip
from zsad.methods.bagclip import BagClip
from zsad.methods.base import AnomalyOutput, Method
from zsad.methods.bayespfl import BayesPfl
from zsad.methods.sowa import Sowa
from zsad.methods.stages import Stage, run_stages

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (AnomalyClip, BagClip, AfClip, Sowa, BayesPfl)}


def available() -> list[str]:
    return sorted(METHODS)


def resolve_config(name: str, profile: str = "paper", **overrides):
    if name not in METHODS:
        raise ZsadError(f"unknown method '{name}' (available: {', '.join(available())})")
    cls = METHODS[name]
    data = deep_merge(resolve_profile(name, profile), overrides)
    return build_config(cls.config_class, data, where=f"{name}/{profile}")


def build(name: str, config, profile: str) -> Method:
    """Instantiate from a resolved config; initialisation is seeded by backbone.init_seed (reproducible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.backbone.init_seed)
        method = METHODS[name](config, profile)
    return method.eval()


def create(name: str, profile: str = "paper", **overrides) -> Method:
    """Build method ``name`` with its ``profile`` settings, ``overrides`` deep-merged on top."""
    return build(name, resolve_config(name, profile, **overrides), profile)


__all__ = ["METHODS", "available", "build", "create", "resolve_config", "AnomalyOutput", "Method", "Stage",
           "run_stages"]
