"""The code zsad shares with its served python models: one implementation, run by both.

zsad-export copies this folder, as is, beside every python-backend ``model.py`` it writes (``<model>/1/zsad_common/``,
the same folder name each time), and each model imports from it (``from zsad_common.guard import each_request``);
zsad imports the same files as ``zsad.triton_models.zsad_common``. The rule that makes that possible:

* zsad-free: the modules import the standard library, numpy and Pillow only, and each other by relative imports
  (tests/test_triton_repo_standalone.py reads their imports with ``ast`` and runs the copies where zsad, torch and
  open_clip cannot be imported), so a stock Triton container runs the models that need nothing else;
* their input errors are :class:`~.guard.BadInput` (a served request's HTTP 400); zsad turns it into ``ZsadError``
  where it calls them (``zsad.raising_zsad_error``);
* this file imports nothing: a model imports only the modules it needs (``guard`` needs numpy alone, ``image`` and
  ``transforms`` Pillow too).

Modules: ``guard`` (per-request isolation, the stage models' request loop, ``BadInput``), ``image`` (decoding encoded
images to 8-bit RGB), ``transforms`` (CLIP pre-processing, maps back to the input size), ``text`` (CLIP's BPE
tokeniser and the class-name -> token ids rule).
"""
