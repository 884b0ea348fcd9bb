"""tools/mutants.toml stays applicable as the code moves: a refactor that rewrites a mutated line or moves the test
that kills it turns that mutant into a silent 'not applied' / 'no tests' row of `make mutants`. This catches that
in `make test` instead, without running any mutant."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutants  # noqa: E402  (tools/ is not a package)

MUTANTS = mutants.load_mutants(ROOT / "tools" / "mutants.toml")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("m", MUTANTS, ids=[m["id"] for m in MUTANTS])
def test_mutant_applies_to_one_line_and_names_existing_tests(m, tmp_path):
    src = ROOT / m["file"]
    assert src.is_file(), f"{m['id']}: {m['file']} does not exist"
    text = src.read_text()
    hits = [ln for ln in text.splitlines() if m["original"] in ln]
    assert text.count(m["original"]) == 1 and len(hits) == 1, \
        f"{m['id']}: the original occurs {text.count(m['original'])} times in {m['file']} (must be exactly once)"
    assert m["replacement"] != m["original"]
    # apply() on a copy gives exactly the one-line change
    copy = tmp_path / m["file"]
    copy.parent.mkdir(parents=True)
    copy.write_text(text)
    assert mutants.apply(tmp_path, m) == text
    changed = [(a, b) for a, b in zip(text.splitlines(), copy.read_text().splitlines(), strict=True) if a != b]
    assert len(changed) == 1
    assert m["tests"], f"{m['id']} names no tests"
    for t in m["tests"]:
        file, _, name = t.partition("::")
        assert (ROOT / file).is_file(), f"{m['id']}: test file {file} does not exist"
        if name:
            assert name.split("[")[0] in _test_names(ROOT / file), f"{m['id']}: no test {name} in {file}"


def test_a_selection_whose_tests_all_skip_here_is_not_run_not_survived(tmp_path):
    """The runner's reading of pytest: a test that passes, fails, is deselected by its marker, or skips on this
    machine (an AMX test on a CPU without AMX catches nothing there: its mutant must not read as a survivor)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    (tmp_path / "test_kinds.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert False\n"
        "def test_not_here():\n    pytest.skip('needs AMX')\n"
        "@pytest.mark.slow\ndef test_slow():\n    assert True\n")
    py = Path(sys.executable)
    outcome = {name: mutants.run_tests(py, tmp_path, [f"test_kinds.py::{name}"], 120)[0]
               for name in ("test_ok", "test_bad", "test_not_here")}
    assert outcome == {"test_ok": "passed", "test_bad": "failed", "test_not_here": "all-skipped"}
    assert mutants.run_tests(py, tmp_path, ["test_kinds.py::test_slow"], 120, slow=False)[0] == "none-selected"
    both = ["test_kinds.py::test_ok", "test_kinds.py::test_not_here"]
    assert mutants.run_tests(py, tmp_path, both, 120)[0] == "passed"
