"""Bayes-PFL's two-class prompt banks fused with flow samples (paper Eq. 8-9), and the class-aware sequences.

The bank holds B prompts of P context vectors E_b and Q state vectors S^n_b (normal) / S^a_b (abnormal), all
in the text tower's token width W. With R samples phi^e_r (context, per image), phi^n_r and phi^a_r (states),
prompt (s, r, b) is the P + Q vectors

    [E_b,1 + phi^e_r, ..., E_b,P + phi^e_r, S^s_b,1 + phi^s_r, ..., S^s_b,Q + phi^s_r]

(the same phi^e_r for the normal and the abnormal prompt of a pair; state sample r goes with context sample r).
Sequences are ordered s-major, then r, then b: row s*R*B + r*B + b, so row i (normal) pairs with row i + R*B.

The text of a sequence is "[SOT] <P+Q prompt vectors> <class name> [EOT]": the released code tokenises
"X <class name>" and replaces the embedding of "X" by the prompt; :func:`assemble_sequences` inserts the prompt
right after SOT of the class name's own tokens, which gives the same sequence. Because the text mask is causal
and only the EOT output is read, a sequence cut anywhere after its EOT encodes exactly as the full 77 tokens.

Init (released code): E ~ TruncNormal(0, 0.02), S^n ~ TruncNormal(+0.5, 0.02), S^a ~ TruncNormal(-0.5, 0.02),
truncated at two standard deviations.
"""
from __future__ import annotations

import torch
from torch import nn

from zsad import ZsadError


def _trunc_normal(shape: tuple[int, ...], mean: float, std: float) -> nn.Parameter:
    t = torch.empty(shape)
    nn.init.trunc_normal_(t, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std)
    return nn.Parameter(t)


class PromptBank(nn.Module):
    def __init__(self, banks: int, context_length: int, state_length: int, width: int, std: float = 0.02,
                 state_mean: float = 0.5):
        super().__init__()
        if min(banks, context_length, state_length) < 1:
            raise ZsadError("prompt banks, context length and state length must all be >= 1")
        self.banks, self.context_length, self.state_length = int(banks), int(context_length), int(state_length)
        self.context = _trunc_normal((banks, context_length, width), 0.0, std)
        self.state_normal = _trunc_normal((banks, state_length, width), state_mean, std)
        self.state_abnormal = _trunc_normal((banks, state_length, width), -state_mean, std)

    @property
    def prompt_length(self) -> int:
        return self.context_length + self.state_length

    def forward(self, phi_context: torch.Tensor, phi_normal: torch.Tensor, phi_abnormal: torch.Tensor) -> torch.Tensor:
        """phi_context [N,R,W], phi_normal / phi_abnormal [R,W] -> prompts [N, 2*R*B, P+Q, W]."""
        n, r, width = phi_context.shape
        b, p, q = self.banks, self.context_length, self.state_length
        if phi_normal.shape != (r, width) or phi_abnormal.shape != (r, width):
            raise ZsadError(f"state samples must be [{r},{width}], got {tuple(phi_normal.shape)} / "
                            f"{tuple(phi_abnormal.shape)}")
        ctx = self.context.unsqueeze(0).unsqueeze(0) + phi_context.reshape(n, r, 1, 1, width)  # [N,R,B,P,W]
        seqs = []
        for state, phi in ((self.state_normal, phi_normal), (self.state_abnormal, phi_abnormal)):
            st = (state.unsqueeze(0) + phi.reshape(r, 1, 1, width)).unsqueeze(0).expand(n, r, b, q, width)
            seqs.append(torch.cat([ctx, st], dim=3))  # [N,R,B,P+Q,W]
        return torch.stack(seqs, dim=1).reshape(n, 2 * r * b, p + q, width)


def assemble_sequences(prompts: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """prompts [N,T,K,W] + token embeddings of "[SOT] name [EOT] pad" [N,Lc,W] -> [N,T,Lc+K,W] (prompt after SOT)."""
    n, t, _, width = prompts.shape
    sot = class_embeddings[:, :1].unsqueeze(1).expand(n, t, 1, width)
    rest = class_embeddings[:, 1:].unsqueeze(1).expand(n, t, class_embeddings.shape[1] - 1, width)
    return torch.cat([sot, prompts, rest], dim=2)
