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
