"""TowerViT vs stage-wise ViT (the TowerViT project), with PiT-style pooling (Heo et al., arXiv 2103.16302) as
an option.

A TowerViT keeps one width through the stack: it is the reference ViT, registered under the TowerViT project's
names.
The staged ViT splits the blocks into stages of growing width W_1 < W_2 < ... (heads grow with width, the
head size staying fixed). Between stages a transition maps the tokens to the next width:

- `linear` (the TowerViT project's "dynamic embedding dimension"): z <- z W_s for every token, the cls token included;
- `pool` (PiT): the patch tokens, laid out as their G x G grid, go through a depthwise 3x3 stride-2 conv
  (channel multiplier W_{s+1}/W_s) that halves the grid; the cls token goes through a Linear.

Blocks are numbered across stages (`blocks.0 ...`) and a one-stage model has no transitions, so it has the
reference ViT's exact state dict: the tower is the one-stage case (tests/test_staged_vit.py).
The TowerViT repository built a position embedding and never added it; ours adds it (at the input, as PiT).
"""
from __future__ import annotations

from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from ..errors import VitlabError
from ..layers.token_merge import TokenMerging
from ..registry import register_model
from .vit import VisionTransformer, drop_path_rates


class LinearTransition(nn.Module):
    """Every token, cls included, through Linear(W_in, W_out)."""

    def __init__(self, dim_in: int, dim_out: int, grid: int, prefix: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.grid_out = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PoolTransition(nn.Module):
    """PiT pooling: depthwise stride-2 conv on the patch grid, Linear on the prefix (cls) tokens."""

    def __init__(self, dim_in: int, dim_out: int, grid: int, prefix: int):
        super().__init__()
        if dim_out % dim_in:
            raise VitlabError(f"pooling transitions widen by whole multiples (depthwise conv); width {dim_out} "
                              f"is not a multiple of {dim_in}")
        self.grid, self.grid_out, self.prefix = grid, -(-grid // 2), prefix
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=2, padding=1, groups=dim_in)
        self.fc = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, D = x.shape
        cls, tokens = x[:, :self.prefix], x[:, self.prefix:]
        grid = tokens.transpose(1, 2).reshape(B, D, self.grid, self.grid)  # (B, D, G, G)
        tokens = self.conv(grid).flatten(2).transpose(1, 2)  # (B, ceil(G/2)^2, D_out)
        return torch.cat([self.fc(cls), tokens], dim=1)


TRANSITIONS = {"linear": LinearTransition, "pool": PoolTransition}


class StagedViT(VisionTransformer):
    """The reference ViT with `len(widths)` stages; `depths[s]` blocks of width `widths[s]` in stage s."""
    derived_arguments = ("embed_dim", "depth", "num_heads")  # from widths, depths and head_dim

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 widths: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (2, 2, 2),
                 head_dim: int = 16, transition: Literal["linear", "pool"] = "linear", **kwargs):
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(depths) or not widths:
            raise VitlabError(f"widths {widths} and depths {depths} must name the same number (>= 1) of stages")
        if transition not in TRANSITIONS:
            raise VitlabError(f"transition must be one of {', '.join(TRANSITIONS)}, got {transition!r}")
        if transition == "pool" and kwargs.get("tokenizer", "patch") == "quadtree":
            raise VitlabError("pooling transitions pool a patch grid; a quadtree's leaves have none: use "
                              "model.transition=linear with model.tokenizer=quadtree")
        if transition == "pool" and kwargs.get("head", "classify") == "segment" and len(widths) > 1:
            raise VitlabError("pooling transitions merge tokens, whose boxes the segmentation head paints: use "
                              "model.transition=linear with model.head=segment")
        if any(w % head_dim for w in widths):
            raise VitlabError(f"every stage width {widths} must be a multiple of head_dim {head_dim}")
        # plain attributes, read by the construction hooks that the reference constructor calls
        self.widths, self.depths, self.head_dim, self.transition = widths, depths, head_dim, transition
        self.stage_ends = [sum(depths[:s + 1]) for s in range(len(depths))]
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim=widths[0], depth=sum(depths),
                         num_heads=widths[0] // head_dim, **kwargs)

    def _build_blocks(self, depth: int) -> nn.Sequential:
        """Blocks numbered across stages (`blocks.0 ...`), and the transitions between stages."""
        rates = drop_path_rates(self.drop_path_rate, depth)
        blocks, transitions, grid = [], [], getattr(self.patch_embed, "grid_size", 0)  # no grid: linear only
        for s, width in enumerate(self.widths):
            blocks += [self._build_block(i, width, width // self.head_dim, rates[i])
                       for i in range(self.stage_ends[s] - self.depths[s], self.stage_ends[s])]
            if s + 1 < len(self.widths):
                transitions.append(TRANSITIONS[self.transition](width, self.widths[s + 1], grid,
                                                                self.num_prefix_tokens))
                grid = transitions[-1].grid_out
        self.transitions = nn.ModuleList(transitions)
        return nn.Sequential(*blocks)

    def _num_features(self) -> int:
        return self.widths[-1]

    @property
    def _kind(self) -> str:
        if len(self.widths) == 1:
            return "tower_vit"
        return "pit_vit" if self.transition == "pool" else "staged_vit"

    def _stages(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, TokenMerging | None]]:
        """Each block's output with its token-merging state. A transition reads its stage's full token grid,
        so merged tokens are given back first and merging starts afresh in the next stage."""
        transition_after = {end - 1: s for s, end in enumerate(self.stage_ends[:-1])}  # last block of a stage
        merging = self.new_merging(x)
        for i, block in enumerate(self.blocks):
            x = block(x, merging)
            yield x, merging
            if i in transition_after:
                x = x if merging is None else merging.unmerge(x)
                x = self.transitions[transition_after[i]](x)  # (B, 1+N_s, W_s) -> (B, 1+N_{s+1}, W_{s+1})
                merging = self.new_merging(x, i + 1)

    def iter_blocks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for x, merging in self._stages(x):
            yield x if merging is None else merging.unmerge(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for x, merging in self._stages(x):
            pass
        return x if merging is None else merging.unmerge(x)


def _register() -> None:
    # the TowerViT project: patch 4 on 32 px (CIFAR-10), widths 64 -> 128 -> 256 with heads 4/8/16, vs a
    # constant-width tower
    register_model("tower_vit_patch4_32", VisionTransformer, img_size=32, patch_size=4,
                   embed_dim=128, depth=6, num_heads=8, num_classes=10)
    for name, transition in (("staged_vit_patch4_32", "linear"), ("pit_vit_patch4_32", "pool")):
        register_model(name, StagedViT, img_size=32, patch_size=4, widths=(64, 128, 256),
                       depths=(2, 2, 2), head_dim=16, transition=transition, num_classes=10)
    # CPU-sized versions for MNIST: 16 tokens (patch 7), the same block budget
    register_model("tower_vit_patch7_28", VisionTransformer, img_size=28, patch_size=7,
                   in_chans=1, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    for name, transition in (("staged_vit_patch7_28", "linear"), ("pit_vit_patch7_28", "pool")):
        register_model(name, StagedViT, img_size=28, patch_size=7, in_chans=1,
                       widths=(32, 64, 128), depths=(2, 2, 2), head_dim=16, transition=transition, num_classes=10)


_register()
