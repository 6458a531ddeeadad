"""TowerViT vs stage-wise ViT (seed 004), with PiT-style pooling (Heo et al., arXiv 2103.16302) as an option.

A TowerViT keeps one width through the stack: it is the reference ViT, registered under seed 004's names.
The staged ViT splits the blocks into stages of growing width W_1 < W_2 < ... (heads grow with width, the
head size staying fixed). Between stages a transition maps the tokens to the next width:

- `linear` (seed 004's "dynamic embedding dimension"): z <- z W_s for every token, the cls token included;
- `pool` (PiT): the patch tokens, laid out as their G x G grid, go through a depthwise 3x3 stride-2 conv
  (channel multiplier W_{s+1}/W_s) that halves the grid; the cls token goes through a Linear.

Blocks are numbered across stages (`blocks.0 ...`) and a one-stage model has no transitions, so it has the
reference ViT's exact state dict: the tower is the one-stage case (tests/test_staged_vit.py).
Seed 004's repository built a position embedding and never added it; ours adds it (at the input, as PiT).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from ..errors import VitlabError
from ..layers import Block
from ..layers.block import LayerNorm
from ..registry import register_model
from .vit import VisionTransformer, attn_factory


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

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 widths: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (2, 2, 2),
                 head_dim: int = 16, transition: Literal["linear", "pool"] = "linear", mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True, global_pool: Literal["token", "avg"] = "token",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: float | None = None, attn_layer: str = "mhsa", stem: str = "patch"):
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(depths) or not widths:
            raise VitlabError(f"widths {widths} and depths {depths} must name the same number (>= 1) of stages")
        if transition not in TRANSITIONS:
            raise VitlabError(f"transition must be one of {', '.join(TRANSITIONS)}, got {transition!r}")
        if any(w % head_dim for w in widths):
            raise VitlabError(f"every stage width {widths} must be a multiple of head_dim {head_dim}")
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim=widths[0], depth=0,
                         num_heads=widths[0] // head_dim, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         class_token=class_token, global_pool=global_pool, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, init_values=init_values,
                         attn_layer=attn_layer, stem=stem)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        attn = attn_factory(attn_layer)
        blocks, transitions, grid, i = [], [], self.patch_embed.grid_size, 0
        for s, (width, depth) in enumerate(zip(widths, depths)):
            for _ in range(depth):
                blocks.append(Block(width, width // head_dim, mlp_ratio, qkv_bias, drop=drop_rate,
                                    attn_drop=attn_drop_rate, drop_path=dpr[i], init_values=init_values,
                                    attn_layer=attn(i)))
                i += 1
            if s + 1 < len(widths):
                transitions.append(TRANSITIONS[transition](width, widths[s + 1], grid, self.num_prefix_tokens))
                grid = transitions[-1].grid_out
        self.blocks = nn.Sequential(*blocks)
        self.transitions = nn.ModuleList(transitions)
        self.stage_ends = [sum(depths[:s + 1]) for s in range(len(depths))]
        self.architecture = "tower_vit" if len(widths) == 1 else f"{'pit' if transition == 'pool' else 'staged'}_vit"
        self.embed_dim = widths[-1]
        self.norm = LayerNorm(widths[-1]) if global_pool == "token" else nn.Identity()
        self.fc_norm = LayerNorm(widths[-1]) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        start = 0
        for s, end in enumerate(self.stage_ends):
            x = self.blocks[start:end](x)
            if s < len(self.transitions):
                x = self.transitions[s](x)  # (B, 1+N_s, W_s) -> (B, 1+N_{s+1}, W_{s+1})
            start = end
        return x


def _register() -> None:
    # seed 004: patch 4 on 32 px (CIFAR-10), widths 64 -> 128 -> 256 with heads 4/8/16, vs a constant-width tower
    register_model("tower_vit_patch4_32", VisionTransformer, family="tower", img_size=32, patch_size=4,
                   embed_dim=128, depth=6, num_heads=8, num_classes=10)
    for name, transition in (("staged_vit_patch4_32", "linear"), ("pit_vit_patch4_32", "pool")):
        register_model(name, StagedViT, family="staged", img_size=32, patch_size=4, widths=(64, 128, 256),
                       depths=(2, 2, 2), head_dim=16, transition=transition, num_classes=10)
    # CPU-sized versions for MNIST: 16 tokens (patch 7), the same block budget
    register_model("tower_vit_patch7_28", VisionTransformer, family="tower", img_size=28, patch_size=7,
                   in_chans=1, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    for name, transition in (("staged_vit_patch7_28", "linear"), ("pit_vit_patch7_28", "pool")):
        register_model(name, StagedViT, family="staged", img_size=28, patch_size=7, in_chans=1,
                       widths=(32, 64, 128), depths=(2, 2, 2), head_dim=16, transition=transition, num_classes=10)


_register()
