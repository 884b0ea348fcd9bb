"""zsad-deploy: switch the model version a running zsad-serve serves, without a failed request.

    zsad-export --checkpoint runs/bag-v2 --backend python-ort --out repo --version 2   # adds version 2
    zsad-deploy update repo --version 2        # load, check, switch, retire version 1
    zsad-deploy rollback repo                  # back to the version before, the same way
    zsad-deploy status repo

A switch from version A to B (repository layout: zsad.export.versions), through the running server's
model-repository API with the admin key that zsad-serve keeps in its run directory:

0. the ensembles are reloaded pinned to A (an export never switched names "latest" in its running ensembles);
1. every model but the ensembles loads A and B side by side (config: ``version_policy specific [A, B]``);
2. B is checked before any client sees it: the parity gate's images exported with B (``reference_vB.npz``) run
   through the ensemble's steps, each called at version B, and must give B's exported eager answers (relative
   tolerance 1e-3, as zsad.serve.loadtest; a bf16 / int8 export: the precision gate it passed at export, see
   compare_with_reference); if not, B is unloaded and nothing served changed;
3. the ensembles are reloaded with every step pinned to B: requests accepted before finish on the old ensemble,
   whose steps name A (never a mix), new ones run B;
4. after ``grace`` seconds (the old ensemble's requests finish), A is unloaded and ``versions.json`` records B as
   active and A as previous (what ``rollback`` goes back to).

The configs on disk follow each step, so a restarted server serves what was active. zsad-serve's stub monitor
pauses while a switch holds the run directory's update lock (a reload restarts the stubs on purpose).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
import urllib.error
from pathlib import Path
from typing import Any

import click
import numpy as np

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.export import versions as V
from zsad.serve.server import KEY_FILE, SERVER_STATE, UPDATE_LOCK, admin_post, default_run_dir, private_dir

CHECK_TOL = 1e-3  # as zsad.serve.loadtest.run_load: batch-size rounding, never another request's answer
GRACE_S = 3.0


class Connection:
    """The running zsad-serve of a repository: its HTTP endpoint and admin key, read from its run directory."""

    def __init__(self, repo: Path, run_dir: Path | None = None):
        where = Path(run_dir) if run_dir else default_run_dir(repo)
        state_file, key_file = where / SERVER_STATE, where / KEY_FILE
        # a stopped zsad-serve removes the run directory it made: same answer as a directory without its files
        if not where.is_dir() or not state_file.is_file() or not key_file.is_file():
            raise ZsadError(f"no zsad-serve runs on {repo} ({where} has no {SERVER_STATE}): start it with "
                            f"zsad-serve {repo}, or give its --run-dir")
        self.run_dir = private_dir(where, create=False)
        state = json.loads(state_file.read_text())
        if Path(state["repo"]) != Path(repo).resolve():
            raise ZsadError(f"{state_file} belongs to a server of {state['repo']}, not {Path(repo).resolve()}")
        self.http_url: str = state["http"]
        self.key = key_file.read_text().strip()

    def admin(self, path: str, timeout: float = 300):
        try:
            return admin_post(self.http_url, self.key, path, timeout)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise ZsadError(f"the server refused {path}: HTTP {err.code} {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ZsadError(f"no answer from the zsad-serve at {self.http_url} ({err}): is it still running?") from None

    def load(self, models: list[str]) -> None:
        """(Re)load ``models`` from their configs on disk, side by side (as tritonserver loads at start: one by
        one, a switch of a six-model export took 62 s instead of ~13 on a busy 2-core box)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, len(models))) as pool:
            list(pool.map(lambda m: self.admin(f"/v2/repository/models/{m}/load"), models))

    def loaded(self) -> dict[str, list[int]]:
        """{model: its versions in state READY}."""
        out: dict[str, list[int]] = {}
        for m in self.admin("/v2/repository/index", timeout=10):
            if m.get("state") == "READY":
                out.setdefault(m["name"], []).append(int(m["version"]))
        return out

    @contextlib.contextmanager
    def update_lock(self):
        """Held for a whole switch: one switch at a time, and zsad-serve's stub monitor waits."""
        with open(self.run_dir / UPDATE_LOCK) as f:  # zsad-serve made it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ZsadError(f"another zsad-deploy is switching versions on this server ({self.run_dir})") from None
            yield


def run_version(http_url: str, repo: Path, ensemble: str, version: int, inputs: dict[str, np.ndarray]) -> dict:
    """Run ``ensemble``'s steps one by one, each step's model at ``version``, on ``inputs`` (the ensemble's input
    tensors); returns every tensor produced. Steps run once their inputs exist (the listed order is not the run
    order: the text models feed preprocess)."""
    import tritonclient.http as th
    from tritonclient.utils import np_to_triton_dtype

    steps = list(V.read_config(Path(repo) / ensemble / "config.pbtxt").ensemble_scheduling.step)
    tensors = dict(inputs)
    client = th.InferenceServerClient(http_url, network_timeout=300)
    try:
        while steps:
            ready = [s for s in steps if all(v in tensors for v in s.input_map.values())]
            if not ready:
                raise ZsadError(f"{ensemble}: steps {[s.model_name for s in steps]} wait for tensors nobody makes")
            for step in ready:
                feed = []
                for model_input, tensor in step.input_map.items():
                    arr = tensors[tensor]
                    feed.append(th.InferInput(model_input, list(arr.shape), np_to_triton_dtype(arr.dtype)))
                    feed[-1].set_data_from_numpy(arr)
                wanted = [th.InferRequestedOutput(o) for o in step.output_map]
                res = client.infer(step.model_name, feed, model_version=str(version), outputs=wanted)
                for model_output, tensor in step.output_map.items():
                    tensors[tensor] = res.as_numpy(model_output)
                steps.remove(step)
    finally:
        client.close()
    return tensors


def check_version(http_url: str, repo: Path, name: str, version: int) -> dict:
    """Version ``version``'s answers to its exported images against its exported eager answers; raises ZsadError
    if one differs by more than CHECK_TOL relative to its scale. Returns the worst relative differences."""
    ref = V.load_reference(V.reference_path(repo, name, version))
    inputs = {"image": ref["images"]}
    if "class_names" in ref:  # the raw ensemble's text inputs (Bayes-PFL: class_name), one per image
        fields = [s for s in V.read_config(Path(repo) / f"{name}_raw" / "config.pbtxt").input if s.name != "image"]
        for field in fields:
            inputs[field.name] = np.array([[c.encode()] for c in ref["class_names"]], dtype=object)
    out = run_version(http_url, repo, f"{name}_raw", version, inputs)
    result, failure = compare_with_reference(out["score"].reshape(-1), out["anomaly_map"], ref)
    if failure:
        raise ZsadError(f"version {version} of {name} does not give the answers exported with it ({failure}): "
                        "not switched")
    return result


def compare_with_reference(score: np.ndarray, amap: np.ndarray, ref: dict) -> tuple[dict, str]:
    """(the measures, "" or what fails) of served answers against a version's exported eager ones, by the rule the
    export stored with them (zsad.export.exporter.reference_check): relative differences within a tolerance
    (CHECK_TOL without a rule), or for bf16 / int8 versions the precision gate they passed at export
    (zsad.export.parity's gate: anomaly-map correlation and no image pair ranked otherwise beyond a near-tie; no
    pixel AUROC, the stored images have no masks)."""
    from zsad.export.parity import GateThresholds, gate_failures, gate_metrics

    rule: dict[str, Any] = json.loads(str(ref["check"])) if "check" in ref else {"rule": "relative", "tol": CHECK_TOL}
    ref_score, ref_map = ref["score"].astype(np.float64), ref["anomaly_map"].astype(np.float64)
    worst = {"score": float(np.max(np.abs(score - ref_score) / np.maximum(np.abs(ref_score), 1e-12))),
             "anomaly_map": float(np.abs(amap - ref_map).max() / max(float(np.abs(ref_map).max()), 1e-12))}
    if rule["rule"] == "gate":
        metrics = gate_metrics(ref_score, ref_map, score, amap, None, rule["score_tie"])
        fails = gate_failures(metrics, GateThresholds(map_corr=rule["map_corr"], score_tie=rule["score_tie"]))
        return {"rule": f"{rule['precision']} precision gate", **metrics, **worst}, "; ".join(fails)
    tol = max(rule.get("tol", CHECK_TOL), CHECK_TOL)
    failure = "" if max(worst.values()) <= tol else f"worst relative difference {worst}, tolerance {tol:g}"
    return {"rule": f"relative difference <= {tol:g}", **worst}, failure


def switch(conn: Connection, repo: Path, name: str, target: int, grace: float = GRACE_S, log=print) -> dict:
    """Serve version ``target`` of export ``name`` instead of the active one (steps in the module docstring)."""
    repo = Path(repo)
    models = V.export_models(repo, name)
    stages = [m for m, ensemble in models.items() if not ensemble]
    ensembles = [m for m, ensemble in models.items() if ensemble]
    missing = [m for m in stages if not (repo / m / str(target)).is_dir()]
    if missing:
        raise ZsadError(f"version {target} of {name} is not in {repo} (no {repo / missing[0] / str(target)}); "
                        f"write it with zsad-export --out {repo} --name {name} --version {target}")
    V.load_reference(V.reference_path(repo, name, target))  # refuse before touching anything
    t0 = time.monotonic()
    with conn.update_lock():
        active = V.pin_active(repo, name, models)
        if active == target:
            raise ZsadError(f"version {target} of {name} is already the one served")
        # the running ensembles may still name their steps' latest version (-1: an export before any --version):
        # once two versions are loaded, a request would take each step's latest when it starts, one model after
        # the other, while the new version loads (seen: version 2's encoder with version 1's head). Pinned first.
        conn.load(ensembles)
        for m in stages:
            V.set_versions(repo, m, [active, target])
        conn.load(stages)  # only the new version starts: Triton keeps a loaded version whose files are unchanged
        log(f"loaded version {target} beside {active} ({time.monotonic() - t0:.1f} s)")
        try:
            worst = check_version(conn.http_url, repo, name, target)
        except Exception:
            for m in stages:  # B out again; the ensembles never saw it
                V.set_versions(repo, m, [active])
            conn.load(stages)
            raise
        log(f"version {target} gives its exported answers ({worst['rule']}; worst relative difference "
            f"{max(worst['score'], worst['anomaly_map']):.1e})")
        for e in ensembles:
            V.pin_ensemble(repo, e, target)
        conn.load(ensembles)
        log(f"ensembles {', '.join(ensembles)} now run version {target}; retiring {active} in {grace:g} s")
        time.sleep(grace)
        for m in stages:
            V.set_versions(repo, m, [target])
        conn.load(stages)  # returns at once; Triton unloads the old version once its accepted requests are done
        V.write_versions_state(repo, name, target, active)
    seconds = round(time.monotonic() - t0, 1)
    log(f"{name}: version {target} served, {active} retired ({seconds} s); zsad-deploy rollback goes back to {active}")
    return {"active": target, "previous": active, "seconds": seconds, "check": worst}


def rollback(conn: Connection, repo: Path, name: str, grace: float = GRACE_S, log=print) -> dict:
    previous = V.versions_state(repo, name)["previous"]
    if previous is None:
        raise ZsadError(f"{name} has no previous version to go back to (no switch was made with zsad-deploy)")
    return switch(conn, repo, name, previous, grace, log)


_common = [click.argument("repo", type=click.Path(exists=True, file_okay=False)),
           click.option("--name", default=None, help="The exported model's name [default: the only export in REPO]."),
           click.option("--run-dir", type=click.Path(), default=None,
                        help="zsad-serve's run directory [default: the one zsad-serve picks for REPO].")]


def _options(fn):
    for decorator in reversed(_common):
        fn = decorator(fn)
    return fn


def _only_export(repo: Path, name: str | None) -> str:
    if name:
        return name
    names = sorted({json.loads(p.read_text()).get("export") for p in repo.glob(f"*/{V.MARKER_NAME}")} - {None})
    if len(names) != 1:
        raise ZsadError(f"{repo} holds the exports {names or 'none'}: give --name")
    return names[0]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Switch the model version a running zsad-serve serves: no request fails, none mixes two versions."""


@main.command()
@_options
@click.option("--version", "version", type=int, required=True, help="The version to serve (written by zsad-export "
              "--version).")
@click.option("--grace", type=float, default=GRACE_S, help="Seconds between the switch and unloading the old version "
              "(requests the old ensemble accepted finish meanwhile).")
@cli_entry
def update(repo, name, run_dir, version, grace):
    """Load VERSION into the zsad-serve running on REPO, check it against its exported answers, switch, retire the
    old version."""
    repo = Path(repo)
    name = _only_export(repo, name)
    switch(Connection(repo, run_dir), repo, name, version, grace, log=click.echo)


@main.command("rollback")
@_options
@click.option("--grace", type=float, default=GRACE_S, help="As for update.")
@cli_entry
def rollback_cmd(repo, name, run_dir, grace):
    """Go back to the version served before the last switch (checked the same way)."""
    repo = Path(repo)
    name = _only_export(repo, name)
    rollback(Connection(repo, run_dir), repo, name, grace, log=click.echo)


@main.command()
@_options
@cli_entry
def status(repo, name, run_dir):
    """The active and previous versions on disk and the versions the server has loaded."""
    repo = Path(repo)
    name = _only_export(repo, name)
    state = V.versions_state(repo, name)
    loaded = Connection(repo, run_dir).loaded()
    on_disk = sorted(int(d.name) for d in (repo / f"{name}_preprocess").iterdir() if d.name.isdigit())
    click.echo(json.dumps({"name": name, **state, "versions_on_disk": on_disk,
                           "loaded": {m: v for m, v in loaded.items() if m in V.export_models(repo, name)}}, indent=2))


if __name__ == "__main__":
    main()
