"""Python-backend model sources (one folder per model kind) that zsad-export copies into Triton repositories.

Installed as ``zsad.triton_models`` (package data). The folders are not imported here: each ``model.py`` runs inside
Triton's python-backend stub, next to ``zsad_common/``, the zsad-free package the export copies beside it as is
(zsad imports the same package as ``zsad.triton_models.zsad_common``; see README.md).
"""
