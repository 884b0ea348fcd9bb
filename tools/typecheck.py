"""Type-check zsad and its stage packages with mypy, each module under the name it is installed as.

pyproject.toml maps train/ export/ kernels/ bench/ serve/ triton_models/ into the zsad namespace
([tool.setuptools.package-dir]). mypy's command line names a module after its folder (export/cli.py would be
``export.cli``, and the six ``model.py`` of triton_models/ would clash), so it could not connect those files with
the ``zsad.export.cli`` the rest of the code imports. This script hands mypy every file with its installed name,
so imports across the stage packages are checked too. Settings: [tool.mypy] in pyproject.toml.

    .venv/bin/python tools/typecheck.py        # exit status 1 when mypy reports an error
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from mypy.build import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parents[1]


def installed_modules(root: Path = ROOT) -> list[tuple[Path, str]]:
    """(file, module name) for every .py file of every folder pyproject maps into the zsad namespace."""
    mapped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = []
    for package, folder in mapped.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append((path, ".".join((package, *parts))))
    return modules


def main() -> int:
    # the options of `mypy --config-file pyproject.toml`, without its file discovery
    _, options = process_options(["--config-file", str(ROOT / "pyproject.toml")], require_targets=False)
    sources = [BuildSource(os.path.relpath(path), module) for path, module in installed_modules()]
    try:
        result = build(sources, options)
    except CompileError as err:  # a syntax error stops mypy before type checking
        print("\n".join(err.messages))
        return 2
    for line in result.errors:
        print(line)
    n_files = len({line.split(":")[0] for line in result.errors if ": error:" in line})
    n_errors = sum(": error:" in line for line in result.errors)
    print(f"{n_errors} errors in {n_files} files ({len(sources)} checked)" if n_errors else
          f"no type errors ({len(sources)} files checked)")
    return 1 if n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
