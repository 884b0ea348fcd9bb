"""The papers' result and latency tables as data (paper_tables.json, schema zsad-paper-tables/1).

``paper_metrics(method, dataset)`` returns the published zero-shot numbers for one method on one data set,
keyed like zsad's own metrics (``image_auroc``, ``pixel_aupro``, ...), with where each number was printed.
The method's own paper is preferred; baselines (AnomalyCLIP) come from the first paper that reports them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLES_PATH = Path(__file__).parent / "paper_tables.json"
PAPER_NAMES = {"anomalyclip": "AnomalyCLIP", "bagclip": "BAG-CLIP", "afclip": "AF-CLIP", "bayespfl": "Bayes-PFL",
               "sowa": "SOWA"}
_PAPER_ORDER = ("bagclip", "afclip", "bayespfl", "sowa")
_FEW_SHOT_NAMES = {"afclip": "AF-CLIP+"}  # a method's few-shot variant as its paper's tables name it
_METRIC_ALIASES = {"pro": "aupro"}  # the papers label the same column PRO or AUPRO


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
    """The name a method's rows carry in the tables: AF-CLIP's few-shot rows are AF-CLIP+'s."""
    name = PAPER_NAMES.get(method, method)
    return _FEW_SHOT_NAMES.get(method, name) if setting.startswith("few-shot") else name


def paper_metrics(method: str, dataset: str, setting: str = "zero-shot") -> dict[str, PaperValue]:
    name = paper_method_name(method, setting)
    order = ([method] if method in _PAPER_ORDER else []) + [p for p in _PAPER_ORDER if p != method]
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
    return [r for r in rows if method is None or r["method"] == PAPER_NAMES.get(method, method)]
