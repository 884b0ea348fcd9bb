"""Package discovery for the folders pyproject.toml maps into the ``zsad`` namespace ([tool.setuptools.package-dir]).

setuptools' own discovery (``packages.find``) cannot prefix what it finds under ``train/`` with ``zsad.train``, so
every (sub)package under each mapped folder is listed here, found by walking it. Data-only folders
(``zsad/configs/clip``, ``triton_models/preprocess``) are listed too: setuptools warns about package data in a
folder that is not a listed package. Everything else about the distribution is in pyproject.toml.
"""
from pathlib import Path

from setuptools import find_namespace_packages, setup
from setuptools.config.pyprojecttoml import read_configuration  # reads TOML on Python 3.10 too (no tomllib)

_CONFIG = read_configuration(Path(__file__).with_name("pyproject.toml"), expand=False)
_MAPPED = _CONFIG["tool"]["setuptools"]["package-dir"]
_PACKAGES = [pkg + sub for pkg, folder in _MAPPED.items()
             for sub in [""] + ["." + p for p in find_namespace_packages(folder, exclude=["*__pycache__*"])]]

setup(packages=_PACKAGES)
