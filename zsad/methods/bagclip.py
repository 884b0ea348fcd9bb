"""BAG-CLIP (Wu, Zhang, Li; Electronics 2026, 15(8), 1659): Bifurcated Attention Graph-enhanced CLIP.

Only the paper's headings, tables and budgets survive in our copy, so the internals are our reconstruction
(docs/methods/bagclip.md; every unknown is a config knob):

- BSA: AnomalyCLIP's dual stream (stock global branch + V-V detail branch without FFN) from ``dual_start``;
- detail taps D_l (raw width-D tokens of the V-V stream) at ``taps``;
- SAFR fuses the L scales into F [B,N,D] (SE per scale + ASFF-style per-token scale weights);
- SAG: parameter-free kNN graph over F (cosine, top-k, symmetrised, self-loops, D^-1/2 (A+I) D^-1/2);
- GCN: H = LN(F + GELU(Â F W + b)) (``gcn_layers`` of them);
- JFF: Z_l = ln_post(D_l + gamma H) @ proj with a learnable scalar gamma (init ``jff_gamma_init``);
- text alignment, map and score exactly as AnomalyCLIP (shared code).

Export plan: encoder -> graph (SAFR + the kNN selection, outputs F and the neighbour indices) -> head (Â from those
indices, GCN, JFF, maps) -> postprocess. The selection is the one discontinuous step; as a stage output of its own
it is compared by its tie rule and the head on the same neighbours (zsad.selection), so a trained model whose
patch features sit on near-ties exports (it was refused before, kNN near-ties tripping the 1e-4 gate).

Ablation switches (the paper's SAG / SAFR ablation rows; defaults = the full model):
- ``graph.sag: false``: no kNN graph and no GCN; H = F (the SAFR output goes straight to JFF);
- ``graph.safr: false``: F = the plain mean of the L scales (no SE, no learned scale weights);
- ``graph.jff: concat``: Z_l = ln_post(W [D_l ; H] + b) @ proj with one linear 2D -> D shared by the scales,
  initialised to [I | gamma_init I], b = 0 (so it starts equal to the ``add`` variant).

Published budgets this respects: graph construction 2 N^2 D = 3.84 GFLOPs at 518 px (N = 1369, D = 1024) and
~1.08 M GCN parameters (ours: 1,051,648 for one 1024-wide layer with its LayerNorm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zsad import ZsadError
from zsad.methods.anomalyclip import AnomalyClip, AnomalyClipConfig
from zsad.methods.stages import BoundStage, Stage
from zsad.modules.graph import EDGE_WEIGHTS, GCN, SYMMETRIZE, cosine_similarity_matrix, graph_from_index, knn_select
from zsad.modules.recalibration import ScaleAdaptiveRecalibration
from zsad.selection import TopKSelection

JFF_VARIANTS = ("add", "concat")


@dataclass
class GraphConfig:
    knn_k: int  # neighbours per node (sweep 4/8/16/24)
    edge_weight: str  # binary | relu_cos
    symmetrize: str  # max | mean
    gcn_layers: int
    safr_reduction: int  # SE reduction ratio r
    safr_fusion_dim: int  # per-scale code width of the ASFF weights
    jff_gamma_init: float
    # similarities are compared at 2^-bits resolution, so GEMM rounding (~1e-7, different in ONNX Runtime /
    # TensorRT / the Triton kernel) cannot flip a neighbour: near-equal values tie and the lowest index wins
    sim_resolution_bits: int = 14
    sag: bool = True  # ablation: False = no kNN graph / GCN
    safr: bool = True  # ablation: False = mean over the scales instead of SAFR
    jff: str = "add"  # add: D_l + gamma H | concat: linear [D_l ; H]

    def __post_init__(self):
        if self.jff not in JFF_VARIANTS:
            raise ZsadError(f"graph.jff must be one of {JFF_VARIANTS}, got '{self.jff}'")
        if self.edge_weight not in EDGE_WEIGHTS:
            raise ZsadError(f"graph.edge_weight must be one of {EDGE_WEIGHTS}, got '{self.edge_weight}'")
        if self.symmetrize not in SYMMETRIZE:
            raise ZsadError(f"graph.symmetrize must be one of {SYMMETRIZE}, got '{self.symmetrize}'")
        if self.knn_k < 1 or self.gcn_layers < 1:
            raise ZsadError("graph.knn_k and graph.gcn_layers must be >= 1")


@dataclass
class BagClipConfig(AnomalyClipConfig):
    graph: GraphConfig


class BagClip(AnomalyClip):
    name = "bagclip"
    paper_name = "BAG-CLIP"
    config_class = BagClipConfig

    def __init__(self, config: BagClipConfig, profile: str):
        super().__init__(config, profile)
        g = config.graph
        width = self.backbone.info.width
        n_grid = self.backbone.info.grid ** 2
        if g.sag and g.knn_k >= n_grid:
            raise ZsadError(f"graph.knn_k={g.knn_k} needs more than {n_grid} patches")
        self.safr = (ScaleAdaptiveRecalibration(width, len(config.taps), g.safr_reduction, g.safr_fusion_dim)
                     if g.safr else None)
        self.gcn = GCN(width, g.gcn_layers) if g.sag else None
        if g.jff == "concat":
            self.jff_linear = nn.Linear(2 * width, width)
            with torch.no_grad():  # starts as D_l + gamma_init H, the add variant at init
                eye = torch.eye(width)
                self.jff_linear.weight.copy_(torch.cat([eye, float(g.jff_gamma_init) * eye], dim=1))
                self.jff_linear.bias.zero_()
        else:
            self.jff_gamma = nn.Parameter(torch.tensor(float(g.jff_gamma_init)))

    # -- pieces ------------------------------------------------------------------------------------------------------
    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """SAFR (or the plain mean, ablation): taps [B,L,N,D] -> F [B,N,D]."""
        return self.safr(taps) if self.safr is not None else taps.mean(dim=1)

    def select_neighbours(self, fused: torch.Tensor) -> torch.Tensor:
        """SAG's selection: each patch's k neighbours [B,N,k] int64 (the one discontinuous step)."""
        g = self.config.graph
        return knn_select(fused, g.knn_k, g.sim_resolution_bits)

    def propagate(self, fused: torch.Tensor, knn_index: torch.Tensor) -> torch.Tensor:
        """The graph of the given neighbours (Â) and the GCN over it: H [B,N,D]."""
        g = self.config.graph
        assert self.gcn is not None
        adj = graph_from_index(fused, knn_index, g.edge_weight, g.symmetrize, g.sim_resolution_bits)
        return self.gcn(fused, adj)

    def graph_features(self, taps: torch.Tensor) -> torch.Tensor:
        """SAFR -> SAG -> GCN: taps [B,L,N,D] -> H [B,N,D] (ablations: mean for SAFR, identity for SAG + GCN)."""
        fused = self.fuse(taps)
        if self.gcn is None:
            return fused
        return self.propagate(fused, self.select_neighbours(fused))

    def joint_features(self, taps: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """JFF: the detail taps mixed with H, projected: Z [B,L,N,E]."""
        h = h.unsqueeze(1)
        if self.config.graph.jff == "concat":
            mixed = self.jff_linear(torch.cat([taps, h.expand_as(taps)], dim=-1))
        else:
            mixed = taps + self.jff_gamma * h
        return self.backbone.project_tokens(mixed)

    def patch_features(self, taps: torch.Tensor) -> torch.Tensor:
        return self.joint_features(taps, self.graph_features(taps))

    # -- export plan: the selection is a stage output of its own ---------------------------------------------------
    def graph_stage(self, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """taps -> (F, its kNN neighbours): what the ``graph`` stage computes."""
        fused = self.fuse(taps)
        return fused, self.select_neighbours(fused)

    def graph_head(self, global_embedding: torch.Tensor, taps: torch.Tensor, fused: torch.Tensor,
                   knn_index: torch.Tensor, text: torch.Tensor):
        """``head`` given F and the neighbours (continuous in every input it computes with)."""
        return self.head_outputs(global_embedding, self.joint_features(taps, self.propagate(fused, knn_index)), text)

    def stages(self) -> list[Stage]:
        """encoder -> graph (SAFR + kNN selection) -> head (GCN, JFF, maps) -> postprocess. With ``graph.sag``
        off there is no selection and AnomalyCLIP's three stages serve (SAFR inside the head)."""
        plain = super().stages()
        if self.gcn is None:
            return plain
        encoder, head, post = plain
        g, info = self.config.graph, self.backbone.info
        n, d = info.grid ** 2, info.width
        knn = {"knn_index": ("B", n, g.knn_k)}
        index = {"knn_index": torch.int64}
        graph = Stage("graph", BoundStage(self, "graph_stage"), {"taps": encoder.outputs["taps"]},
                      {"fused": ("B", n, d), **knn}, dtypes=index,
                      selections={"knn_index": TopKSelection("fused", cosine_similarity_matrix, g.knn_k,
                                                             g.sim_resolution_bits)})
        head = Stage("head", BoundStage(self, "graph_head", text=head.module.text),
                     {**head.inputs, "fused": ("B", n, d), **knn}, head.outputs, dtypes=index,
                     index_bounds={"knn_index": n})
        return [encoder, graph, head, post]
