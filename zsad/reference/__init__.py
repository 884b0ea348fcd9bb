"""The papers' result and latency tables as data (paper_tables.json, schema zsad-paper-tables/1).

``paper_metrics(method, dataset)`` returns the published zero-shot numbers for one method on one data set,
keyed like zsad's own metrics (``image_auroc``, ``pixel_aupro``, ...), with where each number was printed.
The method's own paper is preferred; baselines (AnomalyCLIP) come from the first paper that reports them.
How the tables name a method is the method's own fact (``Method.paper_name`` / ``paper_few_shot_name``); the
``paper`` key of a row is the registry name of the method whose paper printed it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLES_PATH = Path(__file__).parent / "paper_tables.json"
_METRIC_ALIASES = {"pro": "aupro"}  # the papers label the same column PRO or AUPRO

# The project's GPU goals (H100 / H200, paper profile): judged by make gpu-check on measurements, and by
# zsad-bench --forecast against the roofline. Plain data here so both read them without importing each other.
GOAL_BAG_B1_MS = 4.0
GOAL_BAG_IMG_S = 550.0
GOAL_BAG_SPEEDUP = 25.0
GOAL_BAYES_B1_MS = 10.0
GOAL_KERNEL_SPEEDUP = 2.0


@dataclass(frozen=True)
class PaperValue:
    value: float  # percent, as printed
    std: float | None
    paper: str
    table: str
    train_dataset: str | None


@lru_cache(maxsize=1)
def tables() -> dict:
    with open(TABLES_PATH) as f:
        return json.load(f)


def known_datasets() -> list[str]:
    return sorted({r["dataset"] for r in tables()["results"]})


def paper_method_name(method: str, setting: str = "zero-shot") -> str:
    """The name a registered method's rows carry in the tables (its ``paper_name``; in a few-shot setting its
    ``paper_few_shot_name`` where it has one, e.g. AF-CLIP+). Any other name is returned as it is."""
    from zsad.methods import METHODS

    cls = METHODS.get(method)
    if cls is None or not cls.paper_name:
        return method
    if setting.startswith("few-shot") and cls.paper_few_shot_name:
        return cls.paper_few_shot_name
    return cls.paper_name


def paper_metrics(method: str, dataset: str, setting: str = "zero-shot") -> dict[str, PaperValue]:
    name = paper_method_name(method, setting)
    papers = list(tables()["papers"])  # the order the data file lists them in
    order = ([method] if method in papers else []) + [p for p in papers if p != method]
    out: dict[str, PaperValue] = {}
    for paper in order:
        for r in tables()["results"]:
            if (r["paper"], r["method"], r["dataset"], r["setting"]) != (paper, name, dataset, setting):
                continue
            key = f"{r['level']}_{_METRIC_ALIASES.get(r['metric'], r['metric'])}"
            out.setdefault(key, PaperValue(r["value"], r["std"], paper, r["table"], r["train_dataset"]))
        if out:
            return out  # all numbers from one paper, never a mix
    return out


def efficiency_rows(method: str | None = None) -> list[dict]:
    rows = tables()["efficiency"]
    return [r for r in rows if method is None or r["method"] == paper_method_name(method)]
