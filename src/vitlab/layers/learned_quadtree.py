"""The learned quadtree tokenizer of GDT-ViT: a Gumbel top-k selector learns to split where detail is.

Stage s sees N_s square patches P of p_in(s) px with their corners X (ROUTED_AND_ADAPTIVE.md A.2):

    z = LN(encoder([cls; Linear(P) + PE(X)] + E_pos))   a small transformer over the stage's patches
    l = W z_cls                                          slot scorer: a logit per sequence position (the original)
      | w . z_i                                          token scorer: a logit from each patch's own output
      | a std(e_i) + w . z_i                             prior: the content heuristic plus a learned correction
      | a std(e_i)                                       heuristic: the content heuristic alone (nothing learned)
      | 0                                                random: the same tree shape, uniform draws (a baseline)
    K = sort(top-k(l + n g)),  k = int(N_s r_s)          g ~ Gumbel(0, 1) in training only, n = noise_scale

e_i is the content quadtree's edge score of patch i (`QuadtreeTokenizer.cell_scores`, score=edge: the sum of
|horizontal| + |vertical| grey differences in its box), std() standardises it over the image's N_s patches
(zero mean, unit deviation, ties broken towards the earlier patch, as the content tree's greedy max); a is
`prior_scale` (learned for `prior`), and the prior's w starts at zero, so training starts at the heuristic:
with n = 0 the `heuristic` scorer picks exactly the content quadtree's cells.
    m = onehot(K) - sg(s) + s,  s = softmax((l + g) / tau)      straight-through: m = onehot(K) in the forward

The selected patches, times m (the scorer's only gradient path; estimator=detail: P_coarse + m (P - P_coarse),
where P_coarse is the patch as its unsplit leaf would show it, so m scales only the detail the split adds and
a flat patch gives the scorer no gradient), split into q^2 children of p_out(s) px for
the next stage; the others become leaves of p_in(s) px, and so do the last stage's children. Every leaf is
resized (bilinear) to the patch size t and embedded by the patch projection, in stage order:

    T = sum_s (N_s - k_s) + N_{S+1},   N_1 = (H / p_in(1))^2,   N_{s+1} = k_s (p_in(s) / p_out(s))^2

tokens, fixed by the plan wherever the tree splits; each token's level is its stage (its leaf size). Leaves are
in stage order, and inside a stage in tree order (the original: unsplit patches, then children by parent) or,
with leaf_order=raster, in raster order of their corners (the content quadtree's order: a one-stage tree with
the heuristic scorer then gives the content quadtree's tokens in its order).

Stage encoders: `vit`, our pre-norm GELU blocks (the model's, so differential attention reaches them too);
or `torch`, the original's torch `TransformerEncoderLayer`s (post-norm, ReLU, dropout 0.1 also on the
input and the attention weights, LayerNorm eps 1e-5, torch's default initialisation, a stage's layers
starting as copies of one, as `nn.TransformerEncoder` makes them).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .block import LayerNorm
from .pos_embed import sincos_2d
from .quadtree import LeafGroup, edge_map, patchify, resize_leaves, split_children
from .tokenizer import TokenSet, Tokenizer, lecun_normal_, project

Stage = tuple[int, int, float]  # (patch size in, patch size out, split ratio r)


def plan_tokens(img_size: int, stages: Sequence[Stage]) -> tuple[list[int], list[int]]:
    """(N_s: patches entering each stage, leaves per group in stage order, the last stage's children last);
    a one-line error for a plan that cannot tile the image."""
    if not stages:
        raise VitlabError("model.stages is empty; give at least one (patch_in, patch_out, ratio) stage")
    if img_size % stages[0][0]:
        raise VitlabError(f"image size {img_size} is not a multiple of the first stage's patch {stages[0][0]}")
    counts, groups = [(img_size // stages[0][0]) ** 2], []
    for s, (p_in, p_out, ratio) in enumerate(stages):
        if s and p_in != stages[s - 1][1]:
            raise VitlabError(f"stage {s} takes {p_in} px patches but stage {s - 1} makes {stages[s - 1][1]} px "
                              f"children; each stage's patch_in must be the previous patch_out")
        if p_out <= 0 or p_in % p_out or p_in == p_out:
            raise VitlabError(f"stage {s}: patch_out {p_out} must divide patch_in {p_in} and be smaller")
        if not 0.0 <= ratio <= 1.0:
            raise VitlabError(f"stage {s}: split ratio {ratio} must be in [0, 1]")
        n = counts[-1]
        if n == 0:
            raise VitlabError(f"stage {s} receives no patches (the stage before splits none); drop it or raise "
                              f"the ratio before it")
        k = int(n * ratio)
        groups.append(n - k)
        counts.append(k * (p_in // p_out) ** 2)
    groups.append(counts[-1])
    return counts, groups


@dataclass
class Tree:
    """One batch's quadtrees: leaf groups in stage order; each stage's sorted selections (B, k) and
    straight-through gates m (B, N_s) (None where the stage selects nothing)."""
    groups: list[LeafGroup]
    selections: list[torch.Tensor]
    gates: list[torch.Tensor | None]

    @property
    def boxes(self) -> torch.Tensor:
        """(B, T, 3): each leaf's (x, y, size), in sequence order."""
        return torch.cat([torch.cat([g.coords, torch.full_like(g.coords[..., :1], g.size)], -1)
                          for g in self.groups], dim=1)


def box_scores(edges: torch.Tensor, coords: torch.Tensor, size: int, context: float = 0.0) -> torch.Tensor:
    """Sum of the edge map (B, 1, H, W) over each square box of `size` px at corners (B, N, 2) -> (B, N); with
    context c > 0, plus c x the mean sum of the box's 3 x 3 neighbourhood (ties among flat boxes go to the
    ones next to the content)."""
    sums = F.avg_pool2d(edges, size) * size * size  # (B, 1, h, w), the grid of size-px cells
    if context:
        sums = sums + context * F.avg_pool2d(sums, 3, stride=1, padding=1, count_include_pad=False)
    width = edges.shape[-1] // size
    index = (coords[..., 1] // size) * width + coords[..., 0] // size
    return sums.flatten(1).gather(1, index.long())


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores (B, N) -> zero mean, unit deviation per image; equal scores ordered by position (earlier first)."""
    z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True, unbiased=False) + 1e-6)
    ties = torch.arange(scores.shape[1], device=scores.device, dtype=z.dtype) / scores.shape[1]
    return z - 1e-4 * ties


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, k) of t (B, N, F) -> (B, k, F)."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


class QuadtreeStage(nn.Module):
    """One level of the tree: a small transformer over the current patches scores them, Gumbel top-k picks k.
    The encoder is `blocks` then a LayerNorm: our pre-norm blocks, or the original's torch post-norm ReLU
    layers (input dropout 0.1, LayerNorm eps 1e-5), as `LearnedQuadtreeTokenizer` chooses."""

    def __init__(self, patch_in: int, patch_out: int, ratio: float, seq_len: int, in_chans: int, dim: int,
                 blocks: list[nn.Module], scorer: Literal["slot", "token", "prior", "heuristic", "random"],
                 norm: nn.Module, input_drop: float = 0.0, prior_scale: float = 1.0, prior_context: float = 0.0):
        super().__init__()
        self.prior_context = prior_context
        self.patch_in, self.patch_out, self.k, self.scorer = patch_in, patch_out, int(seq_len * ratio), scorer
        if scorer == "prior":  # a learned scale of the heuristic's logit
            self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))
        elif scorer == "heuristic":
            self.register_buffer("prior_scale", torch.tensor(float(prior_scale)), persistent=False)
        if scorer in ("random", "heuristic"):  # no encoder: uniform draws, or the content heuristic alone
            return
        self.patch_embed = nn.Linear(in_chans * patch_in ** 2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len + 1, dim))  # learned, by sequence position
        self.input_drop = nn.Dropout(input_drop) if input_drop else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.selector = nn.Linear(dim, seq_len if scorer == "slot" else 1)
        self.zero_correction()

    @torch.no_grad()
    def zero_correction(self) -> None:
        """The prior scorer's learned correction starts at zero: its first trees are the heuristic's."""
        if self.scorer == "prior":
            nn.init.zeros_(self.selector.weight)
            nn.init.zeros_(self.selector.bias)

    def logits(self, pixels: torch.Tensor, coords: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C*p*p), (B, N, 2), the image's edge map (B, 1, H, W) (prior and heuristic scorers) -> one
        score per patch (B, N)."""
        if self.scorer == "random":
            return pixels.new_zeros(pixels.shape[:2])
        if self.scorer in ("prior", "heuristic"):
            prior = self.prior_scale * standardize(box_scores(edges, coords, self.patch_in, self.prior_context))
            prior = prior.to(pixels.dtype)
            if self.scorer == "heuristic":
                return prior
        tokens = self.patch_embed(pixels) + sincos_2d(coords, self.cls_token.shape[-1]).to(pixels.dtype)
        z = torch.cat([self.cls_token.expand(len(pixels), -1, -1), tokens], dim=1) + self.pos_embed  # (B, 1+N, D)
        z = self.norm(self.blocks(self.input_drop(z)))
        if self.scorer == "slot":
            return self.selector(z[:, 0])
        correction = self.selector(z[:, 1:]).squeeze(-1)
        return prior + correction if self.scorer == "prior" else correction

    def forward(self, pixels: torch.Tensor, coords: torch.Tensor, noise: float, tau: float,
                edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected slots K (B, k) ascending, gate m (B, N): one-hot of K forward, softmax gradient); noise: the
        Gumbel noise's scale (0: none)."""
        logits = self.logits(pixels, coords, edges)
        if noise:
            logits = logits - noise * torch.empty_like(logits).exponential_().log()  # + noise * Gumbel(0, 1)
        soft = torch.softmax(logits / tau, dim=-1)
        selected = logits.topk(self.k, dim=1).indices.sort(dim=1).values
        hard = torch.zeros_like(soft).scatter_(1, selected, 1.0)
        return selected, hard - soft.detach() + soft


class LearnedQuadtreeTokenizer(Tokenizer):
    """stages: (patch_in, patch_out, ratio) per level; patch_size: the size t every leaf is resized to;
    max_seq_len: the original's per-stage M, checked against the plan (the slot scorer scores exactly N_s
    positions); make_block(i): stage encoder block i (`stage_encoder=vit`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 stages: Sequence[Stage], stage_depth: int, make_block: Callable[[int], nn.Module],
                 num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 max_seq_len: Sequence[int] | None = None,
                 scorer: Literal["slot", "token", "prior", "heuristic", "random"] = "slot",
                 stage_encoder: Literal["vit", "torch"] = "vit", eval_gumbel: bool = False, tau: float = 1.0,
                 antialias: bool = False, prior_scale: float = 1.0, noise_scale: float = 1.0,
                 leaf_order: Literal["tree", "raster"] = "tree", estimator: Literal["scale", "detail"] = "scale",
                 prior_context: float = 0.0):
        super().__init__()
        stages = [(int(a), int(b), float(r)) for a, b, r in stages]
        counts, groups = plan_tokens(img_size, stages)
        if embed_dim % 4:
            raise VitlabError(f"embed_dim {embed_dim} must be a multiple of 4 (2-D sinusoidal coordinates)")
        if max_seq_len is not None and list(max_seq_len) != counts[:len(stages)]:
            raise VitlabError(f"model.max_seq_len {list(max_seq_len)} does not match the patches each stage "
                              f"receives, {counts[:len(stages)]}; the slot scorer needs them equal (or use "
                              f"model.scorer=token)")
        if scorer not in ("slot", "token", "prior", "heuristic", "random"):
            raise VitlabError(f"model.scorer must be slot, token, prior, heuristic or random, got {scorer!r}")
        if leaf_order not in ("tree", "raster"):
            raise VitlabError(f"model.leaf_order must be 'tree' or 'raster', got {leaf_order!r}")
        if estimator not in ("scale", "detail"):
            raise VitlabError(f"model.estimator must be 'scale' (the original) or 'detail', got {estimator!r}")
        if not noise_scale >= 0:
            raise VitlabError(f"model.noise_scale must be >= 0 (the training Gumbel noise's scale), got {noise_scale}")
        if stage_encoder not in ("vit", "torch"):
            raise VitlabError(f"model.stage_encoder must be 'vit' (pre-norm blocks) or 'torch' (the original's "
                              f"post-norm ReLU layers), got {stage_encoder!r}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.groups = groups
        self.sizes = [p_in for p_in, _, _ in stages] + [stages[-1][1]]  # leaf size of each group
        self.num_tokens = sum(groups)
        self.eval_gumbel, self.tau, self.antialias, self.stage_encoder = eval_gumbel, tau, antialias, stage_encoder
        self.noise_scale, self.leaf_order, self.scorer = float(noise_scale), leaf_order, scorer
        self.estimator = estimator
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

        def encoder() -> tuple[list[nn.Module], nn.Module, float]:
            if scorer in ("random", "heuristic"):
                return [], nn.Identity(), 0.0
            if stage_encoder == "vit":
                return [make_block(i) for i in range(stage_depth)], LayerNorm(embed_dim, norm_eps), 0.0
            # the original's nn.TransformerEncoder deep-copies one layer: a stage's layers start identical
            layer = nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout=0.1,
                                               batch_first=True)
            return [copy.deepcopy(layer) for _ in range(stage_depth)], nn.LayerNorm(embed_dim), 0.1

        self.stages = nn.ModuleList()
        for (p_in, p_out, r), n in zip(stages, counts):
            blocks, norm, input_drop = encoder()
            self.stages.append(QuadtreeStage(p_in, p_out, r, n, in_chans, embed_dim, blocks, scorer, norm, input_drop,
                                             prior_scale, prior_context))
        levels = [g for g, n in enumerate(groups) for _ in range(n)]  # each leaf's group (its size class)
        self.register_buffer("group_levels", torch.tensor(levels, dtype=torch.long), persistent=False)  # (T,)
        plan = ", ".join(f"{n} of {p} px" for n, p in zip(groups, self.sizes))
        self.plan = f"quadtree tokens: {plan}; T = {self.num_tokens}"

    def init_weights(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def init_late(self) -> None:
        if self.stage_encoder == "torch":  # the original keeps torch's default initialisation
            return
        for m in self.stages.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:  # qkv_bias=False: the original classifier's attention has none
                    nn.init.zeros_(m.bias)
        for stage in self.stages:
            stage.zero_correction()

    def _coarse(self, parents: torch.Tensor, size: int) -> torch.Tensor:
        """Patches (B, k, C*s*s) as their unsplit leaf sees them: averaged down by f = s / t to the leaf
        resolution t (what the bilinear resize keeps at f = 2), blown back up to s px (nearest); the patch
        itself where f <= 1 (an unsplit leaf loses no detail)."""
        f = size // self.patch_size
        if f <= 1:
            return parents
        B, k = parents.shape[:2]
        x = F.avg_pool2d(parents.reshape(B * k, self.in_chans, size, size), f)
        return F.interpolate(x, scale_factor=f, mode="nearest").reshape(B, k, -1)

    def grow(self, x: torch.Tensor) -> Tree:
        """Each image's quadtree: leaves, selections and gates (for tokens, plots and tests)."""
        pixels, coords = patchify(x, self.stages[0].patch_in)
        if self.scorer == "random":  # uniform draws, also at inference
            noise = 1.0
        else:
            noise = self.noise_scale if self.training else 1.0 if self.eval_gumbel else 0.0
        edges = edge_map(x) if self.scorer in ("prior", "heuristic") else None
        groups, selections, gates = [], [], []
        for stage in self.stages:
            if stage.k == 0:  # nothing to split: every patch is a leaf
                selected, gate = pixels.new_zeros(len(x), 0, dtype=torch.long), None
                rest = torch.arange(pixels.shape[1], device=x.device).expand(len(x), -1)
            else:
                selected, gate = stage(pixels, coords, noise, self.tau, edges)
                chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(1, selected, True)
                rest = torch.argsort(chosen.to(torch.uint8), dim=1, stable=True)[:, :pixels.shape[1] - stage.k]
            groups.append(LeafGroup(_take(pixels, rest), stage.patch_in, _take(coords, rest)))
            selections.append(selected)
            gates.append(gate)
            parents = _take(pixels, selected)
            if gate is not None:  # x 1 forward; the scorer's gradient path
                m = gate.gather(1, selected)[..., None]  # (B, k, 1)
                if self.estimator == "detail":  # the gate scales the detail the split adds over the leaf
                    coarse = self._coarse(parents, stage.patch_in)
                    parents = coarse + m * (parents - coarse)
                else:  # the original: the gate scales the selected patch's pixels
                    parents = parents * m
            pixels, coords = split_children(parents, _take(coords, selected), stage.patch_in, stage.patch_out,
                                            self.in_chans)
        groups.append(LeafGroup(pixels, self.stages[-1].patch_out, coords))
        if self.leaf_order == "raster":  # each group's leaves by their corners' raster order
            ordered = []
            for g in groups:
                order = (g.coords[..., 1] * self.img_size + g.coords[..., 0]).argsort(dim=1)
                ordered.append(LeafGroup(_take(g.pixels, order), g.size, _take(g.coords, order)))
            groups = ordered
        return Tree(groups, selections, gates)

    def tokenize(self, x: torch.Tensor) -> TokenSet:
        tree = self.grow(x)
        leaves = torch.cat([resize_leaves(g, self.patch_size, self.in_chans, self.antialias) for g in tree.groups],
                           dim=1)  # (B, T, C*t*t)
        return TokenSet(project(self.proj, leaves), tree.boxes, self.group_levels, tree)
