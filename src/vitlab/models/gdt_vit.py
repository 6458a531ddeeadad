"""GDT-ViT (seed 000): tokens from a quadtree that a Gumbel top-k selector learns to split where detail is.

Stage s sees N_s square patches P of p_in(s) px with their corners X (ROUTED_AND_ADAPTIVE.md A.2):

    z = LN(blocks([cls; Linear(P) + PE(X)] + E_pos))     a small ViT over the stage's patches
    l = W z_cls                                          slot scorer: a logit per sequence position (the original)
      | w . z_i                                          token scorer: a logit from each patch's own output
      | 0                                                random: the same tree shape, uniform draws (a baseline)
    K = sort(top-k(l + g)),  k = int(N_s r_s)            g ~ Gumbel(0, 1) in training only
    m = onehot(K) - sg(s) + s,  s = softmax((l + g) / tau)      straight-through: m = onehot(K) in the forward

The selected patches, times m (the scorer's only gradient path), split into q^2 children of p_out(s) px for
the next stage; the others become leaves of p_in(s) px, and so do the last stage's children. Every leaf is
resized (bilinear) to the downstream patch size t and embedded by the ViT's patch projection, in stage order:

    T = sum_s (N_s - k_s) + N_{S+1},   N_1 = (H / p_in(1))^2,   N_{s+1} = k_s (p_in(s) / p_out(s))^2

tokens, fixed by the plan wherever the tree splits. The downstream ViT (our blocks) sees [cls; leaves] with
`leaf_pos`: `seq`, a learned table by sequence position (the original); `coords`, the sinusoidal encoding
of each leaf's corner plus an embedding of its size; or `grid`, a learned grid of the finest leaves' positions
averaged over each leaf's box, plus the size embedding.

Fixed from the original (A.4): no noise at inference (`eval_gumbel` restores it); selections sorted; the plan
checked at construction (the slot scorer needs N_s = max_seq_len); timm blocks instead of a 12 GiB
relative-index buffer; the configured depth and heads honoured; leaf coordinates usable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..errors import VitlabError
from ..layers import LayerNorm
from ..layers.pos_embed import sincos_2d
from ..layers.quadtree import LeafGroup, patchify, resize_leaves, split_children
from ..registry import register_model
from .vit import VisionTransformer

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


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, k) of t (B, N, F) -> (B, k, F)."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


class QuadtreeStage(nn.Module):
    """One level of the tree: a small ViT over the current patches scores them, Gumbel top-k picks k."""

    def __init__(self, patch_in: int, patch_out: int, ratio: float, seq_len: int, in_chans: int, dim: int,
                 blocks: list[nn.Module], scorer: Literal["slot", "token", "random"]):
        super().__init__()
        self.patch_in, self.patch_out, self.k, self.scorer = patch_in, patch_out, int(seq_len * ratio), scorer
        if scorer == "random":  # the baseline tree of the same shape: no encoder, uniform draws
            return
        self.patch_embed = nn.Linear(in_chans * patch_in ** 2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len + 1, dim))  # learned, by sequence position
        self.blocks = nn.Sequential(*blocks)
        self.norm = LayerNorm(dim)
        self.selector = nn.Linear(dim, seq_len if scorer == "slot" else 1)

    def logits(self, pixels: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(B, N, C*p*p), (B, N, 2) -> one score per patch (B, N)."""
        if self.scorer == "random":
            return pixels.new_zeros(pixels.shape[:2])
        tokens = self.patch_embed(pixels) + sincos_2d(coords, self.cls_token.shape[-1]).to(pixels.dtype)
        z = torch.cat([self.cls_token.expand(len(pixels), -1, -1), tokens], dim=1) + self.pos_embed  # (B, 1+N, D)
        z = self.norm(self.blocks(z))
        return self.selector(z[:, 0]) if self.scorer == "slot" else self.selector(z[:, 1:]).squeeze(-1)

    def forward(self, pixels: torch.Tensor, coords: torch.Tensor, noise: bool,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected slots K (B, k) ascending, gate m (B, N): one-hot of K forward, softmax gradient)."""
        logits = self.logits(pixels, coords)
        if noise:
            logits = logits - torch.empty_like(logits).exponential_().log()  # + Gumbel(0, 1)
        soft = torch.softmax(logits / tau, dim=-1)
        selected = logits.topk(self.k, dim=1).indices.sort(dim=1).values
        hard = torch.zeros_like(soft).scatter_(1, selected, 1.0)
        return selected, hard - soft.detach() + soft


class GDTViT(VisionTransformer):
    base_architecture = "gdt_vit"

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 stages: Sequence[tuple[int, int, float]] = ((32, 16, 0.25), (16, 8, 0.25), (8, 4, 0.25),
                                                             (4, 2, 0.25)),
                 stage_depth: int = 4, max_seq_len: Sequence[int] | None = None,
                 scorer: Literal["slot", "token", "random"] = "slot",
                 leaf_pos: Literal["seq", "coords", "grid"] = "seq",
                 eval_gumbel: bool = False, tau: float = 1.0, antialias: bool = False, **kwargs: Any):
        """patch_size: the size t every leaf is resized to (the original's target_leaf_size);
        stages: (patch_in, patch_out, ratio) per level; max_seq_len: the original's per-stage M, checked
        against the plan (the slot scorer scores exactly N_s positions)."""
        stages = [(int(a), int(b), float(r)) for a, b, r in stages]
        counts, groups = plan_tokens(img_size, stages)
        if embed_dim % 4:
            raise VitlabError(f"embed_dim {embed_dim} must be a multiple of 4 (2-D sinusoidal coordinates)")
        if max_seq_len is not None and list(max_seq_len) != counts[:len(stages)]:
            raise VitlabError(f"model.max_seq_len {list(max_seq_len)} does not match the patches each stage "
                              f"receives, {counts[:len(stages)]}; the slot scorer needs them equal (or use "
                              f"model.scorer=token)")
        if kwargs.get("tokenizer", "patch") != "patch":
            raise VitlabError("GDT-ViT makes its own quadtree; model.tokenizer applies to the other families")
        self.groups = groups  # read by _num_positions and _leaf_sizes while the parent builds its tables
        self.sizes = [p_in for p_in, _, _ in stages] + [stages[-1][1]]  # leaf size of each group
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         leaf_pos=leaf_pos, **kwargs)
        self.in_chans, self.eval_gumbel, self.tau, self.antialias = in_chans, eval_gumbel, tau, antialias
        self.stages = nn.ModuleList(
            QuadtreeStage(p_in, p_out, r, n, in_chans, embed_dim, [] if scorer == "random" else
                          [self._build_block(i, embed_dim, self.num_heads, 0.0) for i in range(stage_depth)], scorer)
            for (p_in, p_out, r), n in zip(stages, counts))
        self._init_new_modules()
        plan = ", ".join(f"{n} of {p} px" for n, p in zip(groups, self.sizes))
        self.token_plan = f"quadtree tokens: {plan}; T = {sum(groups)}"

    @torch.no_grad()
    def _init_new_modules(self) -> None:
        for m in self.stages.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _num_positions(self) -> int:
        return self._leaf_positions(sum(self.groups))

    def _leaf_sizes(self) -> int:
        return len(self.groups) if self.leaf_pos != "seq" else 0

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {f"stages.{i}.{n}" for i in range(len(self.stages))
                                            for n in ("pos_embed", "cls_token")}

    # -- the tree ----------------------------------------------------------------------------------------
    def grow(self, x: torch.Tensor) -> Tree:
        """Each image's quadtree: leaves, selections and gates (for tokens, plots and tests)."""
        pixels, coords = patchify(x, self.stages[0].patch_in)
        noise = self.training or self.eval_gumbel or self.stages[0].scorer == "random"
        groups, selections, gates = [], [], []
        for stage in self.stages:
            if stage.k == 0:  # nothing to split: every patch is a leaf
                selected, gate = pixels.new_zeros(len(x), 0, dtype=torch.long), None
                rest = torch.arange(pixels.shape[1], device=x.device).expand(len(x), -1)
            else:
                selected, gate = stage(pixels, coords, noise, self.tau)
                chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(1, selected, True)
                rest = torch.argsort(chosen.to(torch.uint8), dim=1, stable=True)[:, :pixels.shape[1] - stage.k]
            groups.append(LeafGroup(_take(pixels, rest), stage.patch_in, _take(coords, rest)))
            selections.append(selected)
            gates.append(gate)
            kept = pixels if gate is None else pixels * gate[..., None]  # x 1 forward; the scorer's gradient path
            pixels, coords = split_children(_take(kept, selected), _take(coords, selected), stage.patch_in,
                                            stage.patch_out, self.in_chans)
        groups.append(LeafGroup(pixels, self.stages[-1].patch_out, coords))
        return Tree(groups, selections, gates)

    def embed_tree(self, tree: Tree) -> torch.Tensor:
        """Leaves -> [cls; tokens] + positions (B, prefix + T, D)."""
        t = self.patch_embed.patch_size
        leaves = torch.cat([resize_leaves(g, t, self.in_chans, self.antialias) for g in tree.groups], dim=1)
        group = torch.repeat_interleave(torch.arange(len(self.groups), device=leaves.device),
                                        torch.tensor(self.groups, device=leaves.device),
                                        output_size=sum(self.groups))  # (T,) each leaf's size class
        return self.embed_leaves(leaves, torch.cat([g.coords for g in tree.groups], dim=1), group)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_tree(self.grow(x))

    def embed_with_boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tree = self.grow(x)
        return self.embed_tree(tree), tree.boxes

    def leaf_sizes(self) -> list[int]:
        return self.sizes

    def forward_with_tree(self, x: torch.Tensor) -> tuple[torch.Tensor, Tree]:
        """(logits, the quadtree the tokens came from)."""
        tree = self.grow(x)
        return self.forward_head(self.norm(self.forward_blocks(self.embed_tree(tree)))), tree


def _register() -> None:
    # the original's default (configs/gdt_vit.yaml): 4 stages 32 -> 2 px at ratio 0.25, 4 layers each; a
    # 6-block classifier over 256 leaves resized to 16 px
    register_model("gdt_vit_base_256", GDTViT, family="gdt_vit", img_size=256, patch_size=16, embed_dim=768,
                   depth=6, num_heads=12, stage_depth=4, num_classes=1000)
    # CPU scale (A.6): a 64 px canvas, 16 -> 8 -> 4 px, 12 + 8 + 32 = 52 tokens of 4 px
    register_model("gdt_vit_tiny_64", GDTViT, family="gdt_vit", img_size=64, patch_size=4, embed_dim=64,
                   depth=4, num_heads=4, stages=[[16, 8, 0.25], [8, 4, 0.5]], stage_depth=1, num_classes=10)


_register()
