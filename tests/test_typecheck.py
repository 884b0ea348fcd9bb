"""tools/typecheck.py hands mypy every file of zsad and its stage folders under its installed module name: the names
must be the ones Python's import system (the editable install) resolves to those very files."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_has_its_installed_module_name():
    spec = importlib.util.spec_from_file_location("zsad_typecheck", ROOT / "tools" / "typecheck.py")
    typecheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(typecheck)
    modules = typecheck.installed_modules()
    names = [name for _, name in modules]
    assert len(set(names)) == len(names)  # the six triton_models/*/model.py must not clash
    for want in ("zsad.export.cli", "zsad.kernels", "zsad.triton_models.stage_ort.model", "zsad.metrics"):
        assert want in names
    for path, name in modules:
        found = importlib.util.find_spec(name)
        assert found is not None and Path(found.origin).resolve() == path.resolve(), name
