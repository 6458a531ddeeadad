"""Positions of tokens that are not a fixed grid (quadtree leaves), as vectors added to the tokens.

    seq:     E_pos[i]                                  a learned row per sequence slot: where a leaf is only by
                                                       its order (the GDT-ViT original)
    coords:  sincos(x, y) + E_size[level]              the corner's 2-D sinusoidal code, plus a learned
                                                       embedding of the leaf's size
    grid:    mean of G over the box + E_size[level]    G: a learned grid of the finest leaves' positions; on
                                                       a tree whose leaves are all finest it is the uniform
                                                       ViT's learned position table

The learned tables (`pos_embed`, `size_embed`) stay on the model, under timm's key for the former.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .pos_embed import sincos_2d
from .tokenizer import TokenSet

LEAF_POSITIONS = ("seq", "coords", "grid")


class LeafPositions(nn.Module):
    """sizes: every leaf size (px, largest first, each a power-of-two multiple of the last); img_size: px."""

    def __init__(self, kind: Literal["seq", "coords", "grid"], sizes: Sequence[int], img_size: int):
        super().__init__()
        if kind not in LEAF_POSITIONS:
            raise VitlabError(f"model.leaf_pos must be 'seq' (a learned row per token position), 'coords' (the "
                              f"leaf's corner and size) or 'grid' (a learned grid pooled over the leaf), "
                              f"got {kind!r}")
        self.kind, self.sizes, self.img_size = kind, list(sizes), img_size
        if kind == "grid":  # per leaf size: (size px, cells per row of its grid, its first row in the pooled table)
            side = [img_size // s for s in self.sizes]
            first = [sum(n * n for n in side[:i]) for i in range(len(self.sizes))]
            self.register_buffer("leaf_grids", torch.tensor([self.sizes, side, first]).t(), persistent=False)

    def table_rows(self, num_tokens: int) -> int:
        """Rows of the learned position table: one per slot (seq), one per finest cell (grid), none (coords)."""
        return {"seq": num_tokens, "grid": (self.img_size // self.sizes[-1]) ** 2, "coords": 0}[self.kind]

    def size_classes(self) -> int:
        """Leaf sizes the size embedding tells apart (0: no size embedding)."""
        return 0 if self.kind == "seq" else len(self.sizes)

    def encode(self, table: torch.Tensor, size_embed: nn.Embedding | None, tokens: TokenSet) -> torch.Tensor:
        """table (1, rows, D) -> each token's position (1 or B, T, D). (A method, not `forward`: the table is
        the model's parameter, which module hooks such as FLOP counting's must not see as an input.)"""
        if self.kind == "seq":
            return table[:, :tokens.tokens.shape[1]]  # fewer leaves than slots under per-image budgets
        coords, D = tokens.boxes[..., :2], tokens.tokens.shape[-1]
        if self.kind == "coords":
            where = sincos_2d(coords, D).to(tokens.tokens.dtype)
        else:
            where = self.pooled(table, coords, tokens.levels)
        return where + size_embed(tokens.levels)

    def pooled(self, grid: torch.Tensor, coords: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Each leaf's position (B, T, D): the mean of the learned grid (1, G*G, D), one row per cell of the
        finest leaf size m, over the leaf's box. Leaves of size s sit on the s-grid (corners multiples of s), so
        the means are the grid average-pooled by s/m, one pooled table per size, indexed per leaf."""
        D, G, finest = grid.shape[-1], self.img_size // self.sizes[-1], self.sizes[-1]
        table = grid.transpose(1, 2).reshape(1, D, G, G)  # (1, D, G, G)
        pooled = torch.cat([F.avg_pool2d(table, s // finest).flatten(2) for s in self.sizes], dim=2)[0].t()
        size, side, first = self.leaf_grids[levels].unbind(-1)  # each (T,) or (B, T)
        cell = (coords[..., 1].long() // size) * side + coords[..., 0].long() // size  # raster index in its grid
        return pooled[first + cell]  # (B, T, D)
