"""Serving: start a Triton server on a model repository (zsad-serve), a Python client and zsad-infer."""
