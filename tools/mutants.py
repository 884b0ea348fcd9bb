"""Mutation testing: apply one-line bugs to a COPY of the tree, run the tests meant to catch each, report survivors.

    python tools/mutants.py [--list tools/mutants.toml] [--only ID,ID] [--skip-tests FILE,FILE] [--out DIR] [--no-slow]

Each mutant in the list (TOML, ``[[mutant]]`` tables) names a file, an exact substring of one line (it must occur
exactly once in the file), its replacement, and the tests that should fail with it. For every mutant the runner
edits the copy, runs ``pytest -x`` on those tests, records killed (tests failed) / survived (tests passed) /
timeout / error (substring not found: the list is stale) / not-run (its tests deselected, or all skipped on this
machine: e.g. the AMX ones elsewhere), and restores the file.

The working tree is never modified: the tree (tracked + untracked, not ignored) is copied into a temp dir and a
throwaway venv is made there whose ``.pth`` adds the project venv's site-packages (torch etc.) and which gets an
editable install of the COPY, so ``import zsad`` there loads the mutated files. Every test selection is first run
unmutated (a failing baseline makes its mutants 'baseline-fail', not 'killed').

``--skip-tests`` drops test files from every selection (e.g. the files added to kill survivors, to measure the
kill rate without them); a mutant left without tests counts as survived. Writes mutants.json and mutants.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_mutants(path: Path) -> list[dict]:
    data = tomllib.loads(path.read_text())
    mutants = data.get("mutant", [])
    ids = [m["id"] for m in mutants]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        sys.exit(f"error: duplicate mutant ids {sorted(dup)}")
    for m in mutants:
        missing = [k for k in ("id", "area", "file", "original", "replacement", "tests") if k not in m]
        if missing:
            sys.exit(f"error: mutant {m.get('id', '?')} lacks {missing}")
    return mutants


def copy_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (their current contents)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def make_venv(tree: Path, venv: Path) -> Path:
    """A venv on the project venv's packages, with an editable install of ``tree``; returns its python."""
    base_python = ROOT / ".venv" / "bin" / "python"
    subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    base_site = sysconfig.get_paths()["purelib"] if sys.prefix == str(ROOT / ".venv") else subprocess.run(
        [str(base_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    # a path listed in a .pth is added to sys.path but ITS .pth files are not run, so the project venv's editable
    # finder (pointing at the real tree) stays inactive here
    (site / "zz_project_venv.pth").write_text(base_site + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(tree)],
                   check=True, cwd=tree, capture_output=True)
    check = subprocess.run([str(py), "-c", "import zsad, zsad.export, zsad.train; "
                            "print(zsad.__file__); print(zsad.export.__file__); print(zsad.train.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.split()
    if not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in check):
        sys.exit(f"error: the throwaway venv imports zsad from outside the copy: {check}")
    return py


def run_tests(py: Path, tree: Path, tests: list[str], timeout: float, slow: bool = True) -> tuple[str, float, str]:
    """("passed" / "failed" / "none-selected" / "timeout", seconds, pytest's last line). The tests a mutant names
    run whatever their marker (a slow test is named because it is the one that catches that bug), but for gpu
    ones, and slow ones with ``slow=False``; a selection left empty is "none-selected", not a failure."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{py.parent}:{env.get('PATH', '')}"
    marks = "not gpu" if slow else "not slow and not gpu"
    cmd = [str(py), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", marks, *tests]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    # exit 0: passed, or every test skipped here (no " passed" in pytest's summary line: a test for hardware this
    # machine lacks, e.g. AMX, catches nothing on it); 5: every named test deselected by its marker; anything else
    # (a test failed, a collection error, usage): a failure the mutant caused
    outcome = {0: "passed" if " passed" in tail[0] else "all-skipped", 5: "none-selected"}.get(r.returncode, "failed")
    return outcome, time.monotonic() - t0, tail[0][:200]


def apply(tree: Path, m: dict) -> str | None:
    """Edit the copy; returns the original text (to restore) or None when the substring is not there exactly once."""
    path = tree / m["file"]
    text = path.read_text()
    if text.count(m["original"]) != 1:
        return None
    lines_hit = [ln for ln in text.splitlines() if m["original"] in ln]
    if len(lines_hit) != 1:
        return None
    path.write_text(text.replace(m["original"], m["replacement"], 1))
    return text


def selection(m: dict, skip: set[str]) -> list[str]:
    return [t for t in m["tests"] if t.split("::")[0] not in skip]


def report(results: list[dict], out: Path, meta: dict) -> None:
    judged = [r for r in results if r["status"] in ("killed", "survived", "timeout")]
    killed = sum(r["status"] in ("killed", "timeout") for r in judged)
    rate = killed / len(judged) if judged else 0.0
    data = {**meta, "mutants": len(results), "judged": len(judged), "killed_or_timeout": killed,
            "kill_rate": round(rate, 4), "results": results}
    (out / "mutants.json").write_text(json.dumps(data, indent=2))
    lines = [f"# Mutation run {meta['date']}", "",
             f"{killed} of {len(judged)} judged mutants killed (timeouts count as killed): **{rate:.1%}**"
             + (f"; skipped test files: {', '.join(meta['skip_tests'])}" if meta["skip_tests"] else ""), "",
             "| id | area | status | seconds | file | mutation |", "|---|---|---|---|---|---|"]
    for r in results:
        mut = f"`{r['original']}` -> `{r['replacement']}`".replace("|", "\\|")
        lines.append(f"| {r['id']} | {r['area']} | {r['status']} | {r['seconds']:.0f} | {r['file']} | {mut} |")
    survivors = [r for r in results if r["status"] != "killed" and r["status"] != "timeout"]
    lines += ["", "## Not killed", ""] + [f"- {r['id']} ({r['status']}): {r.get('note', '')}" for r in survivors]
    (out / "mutants.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", type=Path, default=ROOT / "tools" / "mutants.toml")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--skip-tests", default="", help="comma-separated test files dropped from every selection")
    ap.add_argument("--out", type=Path, default=None,
                    help="report folder [tools/mutants_out, the committed full-run report; a new temp folder with "
                         "--only or --skip-tests, so a partial run never replaces it]")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    ap.add_argument("--keep", action="store_true", help="keep the temp copy (its path is printed)")
    ap.add_argument("--no-slow", action="store_true",
                    help="leave out the named tests marked slow (a mutant with only slow tests is then 'not-run')")
    args = ap.parse_args(argv)

    mutants = load_mutants(args.list)
    if args.only:
        wanted = set(args.only.split(","))
        mutants = [m for m in mutants if m["id"] in wanted]
    skip = set(filter(None, args.skip_tests.split(",")))
    if args.out is None:
        partial = bool(args.only or skip)
        args.out = Path(tempfile.mkdtemp(prefix="zsad-mutants-report-")) if partial else ROOT / "tools" / "mutants_out"
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zsad-mutants-"))
    tree = work / "tree"
    try:
        copy_tree(tree)
        py = make_venv(tree, work / "venv")
        print(f"copy at {tree}", flush=True)
        baseline: dict[tuple, str] = {}
        results = []
        for i, m in enumerate(mutants, 1):
            tests = selection(m, skip)
            rec = {k: m[k] for k in ("id", "area", "file", "original", "replacement")}
            rec.update(tests=tests, note=m.get("note", ""), seconds=0.0)
            if not tests:
                rec["status"] = "survived"
                rec["note"] = (rec["note"] + " (no test selected)").strip()
            else:
                key = tuple(tests)
                if key not in baseline:
                    baseline[key], _, tail = run_tests(py, tree, tests, args.timeout, not args.no_slow)
                    if baseline[key] != "passed":
                        print(f"  baseline {baseline[key]} for {tests}: {tail}", flush=True)
                original = None if baseline[key] != "passed" else apply(tree, m)
                if baseline[key] == "none-selected":
                    rec["status"] = "not-run"
                    rec["note"] = (rec["note"] + " (its tests are all marked slow or gpu: deselected)").strip()
                elif baseline[key] == "all-skipped":
                    rec["status"] = "not-run"
                    rec["note"] = (rec["note"] + f" (its tests all skip on this machine: {tail})").strip()
                elif baseline[key] != "passed":
                    rec["status"] = "baseline-fail"
                elif original is None:
                    rec["status"] = "error"
                    rec["note"] = "original substring not found exactly once (stale list?)"
                else:
                    try:
                        outcome, secs, tail = run_tests(py, tree, tests, args.timeout, not args.no_slow)
                    finally:
                        (tree / m["file"]).write_text(original)
                    rec["seconds"] = round(secs, 1)
                    rec["status"] = {"failed": "killed", "passed": "survived"}.get(outcome, outcome)
                    rec["pytest"] = tail
            results.append(rec)
            print(f"[{i}/{len(mutants)}] {m['id']}: {rec['status']} ({rec['seconds']:.0f} s)", flush=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "list": str(args.list.relative_to(ROOT)),
                "skip_tests": sorted(skip)}
        report(results, args.out, meta)
        judged = [r for r in results if r["status"] in ("killed", "survived", "timeout")]
        killed = sum(r["status"] != "survived" for r in judged)
        print(f"{killed}/{len(judged)} killed; report: {args.out / 'mutants.md'}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
