"""Which released format a loaded file is, from its top-level structure alone."""
from __future__ import annotations

import torch

from zsad import ZsadError
from zsad.importers.torchfile import ModuleState, TensorRef, describe

AFCLIP_PROMPT = "afclip (prompt)"
AFCLIP_ADAPTOR = "afclip (adaptor)"


def _is_tensor(x) -> bool:
    return isinstance(x, (torch.Tensor, TensorRef))


def detect_format(obj) -> str:
    """'anomalyclip' | 'bayespfl' | 'sowa' | AFCLIP_PROMPT | AFCLIP_ADAPTOR | a description of something else."""
    if isinstance(obj, dict):
        if "prompt_learner" in obj and isinstance(obj["prompt_learner"], dict):
            return "anomalyclip"
        if "MyModel" in obj and isinstance(obj["MyModel"], dict):
            return "bayespfl"
        if "state_dict" in obj and isinstance(obj["state_dict"], dict) and (
                "pytorch-lightning_version" in obj or any(str(k).startswith("net.") for k in obj["state_dict"])):
            return "sowa"
        if "visual.conv1.weight" in obj or "state_dict" in obj and "visual.conv1.weight" in obj["state_dict"]:
            return "a CLIP weights file"
        return f"an unknown dict (keys: {', '.join(describe(k, 40) for k in list(obj)[:5])})"
    if isinstance(obj, ModuleState):
        return AFCLIP_ADAPTOR if obj.qualname.endswith(".Adaptor") else f"a pickled module {obj.qualname}"
    if _is_tensor(obj):
        return AFCLIP_PROMPT if len(obj.shape) == 3 and obj.shape[0] == 1 else f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def flatten(state: dict) -> dict[str, object]:
    """A state dict with string keys and tensor values (anything else: an error naming the key)."""
    out = {}
    for k, v in state.items():
        if not _is_tensor(v):
            raise ZsadError(f"state dict entry {describe(k)} is a {type(v).__name__}, not a tensor")
        if not isinstance(k, str):
            raise ZsadError(f"state dict key {describe(k)} is not a string")
        out[k] = v
    return out
