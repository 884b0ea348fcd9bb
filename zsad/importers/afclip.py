"""AF-CLIP (Faustinaqq/AF-CLIP): ``weight/{mvtec,visa}_prompt.pt`` + ``weight/{mvtec,visa}_adaptor.pt``.

- ``*_prompt.pt``: a pickled ``nn.Parameter`` (1, 12, W) saved on cuda:0: the 12 learnable vectors shared by both
  prompts (placed before SOT). Read with ``torch.load(weights_only=True)`` on the CPU.
- ``*_adaptor.pt``: a pickled whole ``clip.adaptor.Adaptor`` module. Read with the restricted unpickler
  (zsad.importers.torchfile): the module classes become inert stand-ins that keep their tensors; nothing of
  ``clip.adaptor`` is imported or run. Its state (D = vision width, inner = heads x head_dim = 512 at ViT-L):

| key | shape | zsad |
|---|---|---|
| attention.norm.weight / bias | (D,) | adaptor.norm.weight / bias |
| attention.attn.to_q / to_k / to_v.weight | (inner, D) | adaptor.to_q / to_k / to_v.weight |
| attention.attn.to_out.0.weight / bias | (D, inner) / (D,) | adaptor.to_out.weight / bias |

The files may be given in either order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from zsad import ZsadError
from zsad.importers.base import Importer, Mapping, Source
from zsad.importers.detect import AFCLIP_ADAPTOR, AFCLIP_PROMPT, detect_format
from zsad.importers.torchfile import read_torch_file

ADAPTOR_KEYS = {
    "attention.norm.weight": "adaptor.norm.weight",
    "attention.norm.bias": "adaptor.norm.bias",
    "attention.attn.to_q.weight": "adaptor.to_q.weight",
    "attention.attn.to_k.weight": "adaptor.to_k.weight",
    "attention.attn.to_v.weight": "adaptor.to_v.weight",
    "attention.attn.to_out.0.weight": "adaptor.to_out.weight",
    "attention.attn.to_out.0.bias": "adaptor.to_out.bias",
}


class AfClipImporter(Importer):
    name = "afclip"
    method = "afclip"
    files_help = "the two files weight/<data>_prompt.pt and weight/<data>_adaptor.pt (any order)"
    n_files = 2

    def read(self, files: list[Path]) -> Source:
        if len(files) != 2:
            raise ZsadError(f"AF-CLIP needs two files ({self.files_help}), got {len(files)}")
        found: dict[str, tuple[Path, Any]] = {}  # kind -> (file, the unpickled object)
        for f in files:
            obj = read_torch_file(f)
            kind = detect_format(obj)
            if kind not in (AFCLIP_PROMPT, AFCLIP_ADAPTOR):
                raise ZsadError(f"{f} is not an AF-CLIP prompt or adaptor file (detected: {kind})")
            if kind in found:
                raise ZsadError(f"{found[kind][0]} and {f} are both AF-CLIP {kind.split('(')[1][:-1]} files; "
                                f"give one prompt and one adaptor file")
            found[kind] = (f, obj)
        prompt_file, prompt = found[AFCLIP_PROMPT]
        adaptor_file, adaptor = found[AFCLIP_ADAPTOR]
        tensors = {"prompt": prompt, **adaptor.tensors()}
        return Source(self.name, tensors, [prompt_file, adaptor_file],
                      notes={"adaptor_class": adaptor.qualname})

    def convert(self, source: Source, m: Mapping) -> None:
        m.take("prompt", "prompts.ctx", m.target_shapes["prompts.ctx"], "copy (the pickled nn.Parameter)")
        for src, dst in ADAPTOR_KEYS.items():
            m.take(src, dst, m.target_shapes[dst])
