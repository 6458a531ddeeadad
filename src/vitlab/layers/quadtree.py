"""Quadtree geometry over batches of images: square patches with their boxes, split into children, resized to
one leaf size; and the content quadtree tokenizer. (Painting per-leaf predictions back: `segment_head.paint`.)

A patch's pixels are flattened in (channel, row, column) order, the order of a Conv2d(C, D, p, p) weight
viewed as (D, C*p*p) and of `nn.Unfold`; boxes are (x, y, size) with (x, y) the top-left pixel, x the column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .tokenizer import TokenGroups, TokenSet, Tokenizer, lecun_normal_, project


@dataclass
class LeafGroup:
    """Leaves of one size: pixels (B, n, C*size*size) and top-left corners (B, n, 2) as [x, y]."""
    pixels: torch.Tensor
    size: int
    coords: torch.Tensor


def patchify(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> raster-order patches (B, N, C*p*p) and their corners (B, N, 2) as [x, y] (float32)."""
    B, C, H, W = images.shape
    rows, cols = H // patch, W // patch
    x = images.reshape(B, C, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
    gy, gx = torch.meshgrid(torch.arange(rows, device=images.device), torch.arange(cols, device=images.device),
                            indexing="ij")
    coords = torch.stack([gx, gy], dim=-1).reshape(1, -1, 2).float() * patch  # (1, N, 2), pixels
    return x.reshape(B, rows * cols, C * patch * patch), coords.expand(B, -1, -1)


def split_children(pixels: torch.Tensor, coords: torch.Tensor, size: int, child: int,
                   channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch (B, k, C*s*s) at (B, k, 2) -> its q*q children (B, k*q*q, C*c*c), row-major inside each
    parent, parents in their given order; child (i, j) sits at [x + j*c, y + i*c]."""
    B, k = pixels.shape[:2]
    q = size // child
    x = pixels.reshape(B, k, channels, q, child, q, child).permute(0, 1, 3, 5, 2, 4, 6)  # (B, k, q, q, C, c, c)
    i, j = torch.meshgrid(torch.arange(q, device=pixels.device), torch.arange(q, device=pixels.device),
                          indexing="ij")
    offsets = torch.stack([j, i], dim=-1).reshape(1, 1, q * q, 2).to(coords.dtype) * child  # [x, y] per child
    children = (coords[:, :, None, :] + offsets).reshape(B, k * q * q, 2)
    return x.reshape(B, k * q * q, channels * child * child), children


def resize_leaves(group: LeafGroup, target: int, channels: int, antialias: bool = False) -> torch.Tensor:
    """(B, n, C*p*p) -> (B, n, C*t*t): every leaf bilinearly resized to t x t (the identity at p == t)."""
    B, n = group.pixels.shape[:2]
    if group.size == target or n == 0:
        return group.pixels if group.size == target else group.pixels.new_zeros(B, 0, channels * target * target)
    x = group.pixels.reshape(B * n, channels, group.size, group.size)
    x = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False,
                      antialias=antialias and group.size > target)
    return x.reshape(B, n, channels * target * target)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> per-pixel |horizontal| + |vertical| grey differences (B, 1, H, W): the edge score of a
    cell is its sum over the cell (the content quadtree's, and the learned tree's prior)."""
    grey = x.float().mean(1, keepdim=True)
    dx = F.pad((grey[..., :, 1:] - grey[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((grey[..., 1:, :] - grey[..., :-1, :]).abs(), (0, 0, 0, 1))
    return dx + dy


class QuadtreeTokenizer(Tokenizer):
    """A content quadtree with a fixed budget of leaves (the GDT-ViT project's "image pre-processing" form,
    made deterministic and batched in torch): from a grid of `root` px cells, repeatedly split the leaf of
    highest score into its four children (ties within 1e-5: the larger cell first, so a flat image splits
    evenly), down to cells of `min_size` px, until there are `tokens` leaves. Every leaf is resized (bilinear)
    to `patch` px and embedded by the patch projection `proj`, a Conv2d(C, D, patch, patch) as the patch grid's,
    so a quadtree whose leaves are all `patch` px is the patch grid. Scores, on the grey image: `edge`, the
    sum of |horizontal| + |vertical| differences inside the cell; `variance`, the sum of squared deviations
    from the cell's mean. Each split adds three leaves, so `tokens` = roots + 3 k exactly: no padding, and the
    budget is always spent.

    Per-image budgets (`threshold`): a leaf splits only while its score is above the threshold, so each image
    gets as many leaves as its detail needs: a blank image keeps its roots, a busy one gets up to `tokens`
    (the cap). Scores are sums over the cell, so a cell of any size that holds less than `threshold` of edge
    (or variance) stays whole. Each image's split count is rounded up to a multiple of `budget_step` (more
    leaves of the same greedy order), which bounds the number of distinct counts in a batch, and `tokenize`
    returns the images grouped by count (`TokenGroups`): the model runs each group as a dense batch."""

    def __init__(self, img_size: int, patch: int, in_chans: int, embed_dim: int, tokens: int | None, root: int,
                 min_size: int, score: Literal["edge", "variance"] = "edge", threshold: float | None = None,
                 budget_step: int = 4):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        levels = []
        size = root
        while size >= min_size and size >= 1:
            levels.append(size)
            size //= 2
        if img_size % root or not levels or levels[-1] != min_size or any(s % 2 for s in levels[:-1]):
            raise VitlabError(f"quadtree cells must halve from {root} px to {min_size} px and {root} must divide "
                              f"the image ({img_size} px); set model.quadtree_sizes=[root, min] accordingly")
        grids = [img_size // s for s in levels]
        roots, finest = grids[0] ** 2, grids[-1] ** 2
        tokens = finest if tokens is None else tokens
        if not roots <= tokens <= finest or (tokens - roots) % 3:
            raise VitlabError(f"model.tokens={tokens} cannot be a quadtree of {roots} roots of {root} px (each split "
                              f"adds 3 leaves, at most {finest}); choose {roots} + 3k, e.g. "
                              f"{roots + 3 * max(0, (tokens - roots) // 3)}")
        if threshold is not None and not threshold >= 0:
            raise VitlabError(f"model.split_threshold must be a score >= 0 (a leaf splits while its score is above "
                              f"it), got {threshold}")
        if budget_step < 1:
            raise VitlabError(f"model.budget_step must be at least 1 split, got {budget_step}")
        self.threshold, self.budget_step = threshold, budget_step
        self.patch, self.tokens, self.score_kind, self.sizes = patch, tokens, score, levels
        self.num_tokens = tokens
        self.splits = (tokens - roots) // 3
        # every cell of every level, level by level, raster order inside a level: (x, y, size), and its children
        boxes, children, offset = [], [], 0
        for level, (s, g) in enumerate(zip(levels, grids)):
            r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            boxes.append(torch.stack([c * s, r * s, torch.full_like(r, s)], -1).reshape(-1, 3))
            if level + 1 < len(levels):
                nxt = offset + g * g  # first index of the next level, whose grid is 2g wide
                i, j = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
                kid = (2 * r[..., None, None] + i) * 2 * g + 2 * c[..., None, None] + j  # (g, g, 2, 2)
                children.append(nxt + kid.reshape(-1, 4))
            else:
                children.append(torch.zeros(g * g, 4, dtype=torch.long))  # never split: the finest cells
            offset += g * g
        self.register_buffer("boxes", torch.cat(boxes).float(), persistent=False)  # (cells, 3)
        self.register_buffer("child_cells", torch.cat(children), persistent=False)  # (cells, 4)
        self.roots = roots

    def cell_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> every cell's score (B, cells), in the cell table's order."""
        if self.score_kind == "edge":
            per_pixel = [edge_map(x)]
        else:
            grey = x.float().mean(1, keepdim=True)  # (B, 1, H, W)
            per_pixel = [grey, grey.square()]
        scores = []
        for s in self.sizes:
            pooled = [F.avg_pool2d(p, s).flatten(1) for p in per_pixel]  # cell means (B, g*g)
            cell = pooled[0] if self.score_kind == "edge" else (pooled[1] - pooled[0].square()).clamp(min=0)
            scores.append(cell * s * s)  # sums over the cell
        return torch.cat(scores, dim=1)

    def init_weights(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def tokenize(self, x: torch.Tensor) -> TokenSet | TokenGroups:
        leaf = self.leaves(x)
        cells = self.resized_cells(x)
        if self.threshold is None:
            return self._token_set(cells, leaf, self.tokens)
        counts = leaf.sum(dim=1)  # (B,) leaves per image
        groups = []
        for count in torch.unique(counts).tolist():  # one host sync per batch; a loop over distinct counts
            rows = (counts == count).nonzero()[:, 0]
            groups.append((rows, self._token_set(cells[rows], leaf[rows], count)))
        return TokenGroups(groups, counts)

    def _token_set(self, cells: torch.Tensor, leaf: torch.Tensor, count: int) -> TokenSet:
        """Images with `count` leaves each: their leaves' pixels from every cell's (B, cells, C*p*p) -> tokens."""
        index = torch.argsort((~leaf).to(torch.uint8), dim=1, stable=True)[:, :count]  # (B, L) the leaves
        boxes = self.boxes[index]  # (B, L, 3)
        leaves = cells.gather(1, index[..., None].expand(-1, -1, cells.shape[-1]))  # (B, L, C*p*p)
        return TokenSet(project(self.proj, leaves), boxes, self.level(boxes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> leaves resized to patch px (B, tokens, C*p*p) and their boxes (B, tokens, 3) as
        (x, y, size), in the cell table's order (coarse to fine, raster inside a size); fixed budget only."""
        if self.threshold is not None:
            raise VitlabError("a quadtree with per-image budgets gives each image its own number of leaves; "
                              "call tokenize (TokenGroups), not forward")
        index = torch.argsort((~self.leaves(x)).to(torch.uint8), dim=1, stable=True)[:, :self.tokens]
        cells = self.resized_cells(x)
        return cells.gather(1, index[..., None].expand(-1, -1, cells.shape[-1])), self.boxes[index]

    def resized_cells(self, x: torch.Tensor) -> torch.Tensor:
        """Every cell of every size resized to the patch (B, cells, C*p*p), in the cell table's order (cells are
        few: 4/3 of the finest grid)."""
        resized = []
        for s in self.sizes:
            pixels, coords = patchify(x, s)
            resized.append(resize_leaves(LeafGroup(pixels, s, coords), self.patch, x.shape[1]))
        return torch.cat(resized, dim=1)

    def leaves(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> which cells are leaves (B, cells) bool. Greedy: split the leaf of highest score, one
        split per step for the whole batch (a loop over tree steps, not images). With a threshold, image b
        keeps the first s_b splits, s_b = the steps whose best score was above it (scores only fall along the
        greedy order: a child's sum is at most its parent's), rounded up to a multiple of `budget_step`."""
        B, cells = len(x), len(self.boxes)
        size = self.boxes[:, 2]
        key = self.cell_scores(x) + 1e-5 * size / self.sizes[0]  # (B, cells): ties go to the larger cell
        key = key.masked_fill(size <= self.sizes[-1], -torch.inf)  # the finest cells do not split
        leaf = torch.zeros(B, cells, dtype=torch.bool, device=x.device)
        leaf[:, :self.roots] = True
        root = leaf.clone()
        split_cells, split_keys = [], []
        for _ in range(self.splits):
            best_key, best = torch.where(leaf, key, -torch.inf).max(dim=1, keepdim=True)  # (B, 1)
            split_cells.append(best)
            split_keys.append(best_key - 1e-5 * size[best] / self.sizes[0])  # the score without the tie-break
            leaf.scatter_(1, best, False)
            leaf.scatter_(1, self.child_cells[best[:, 0]], True)
        if self.threshold is None or not self.splits:
            return leaf
        cells_split = torch.cat(split_cells, dim=1)  # (B, S): the cell split at each step
        above = (torch.cat(split_keys, dim=1) > self.threshold).long()  # (B, S); once a tree is all finest
        wanted = above.cummin(dim=1).values.sum(dim=1, keepdim=True)  # cells, later steps are void: a prefix
        wanted = (torch.ceil(wanted / self.budget_step) * self.budget_step).clamp(max=self.splits)
        done = torch.arange(self.splits, device=x.device) < wanted  # (B, S): the steps image b keeps
        # rebuild from the roots with the kept steps (a cell split at a dropped step may repeat: count, then >0)
        was_split = torch.zeros(B, cells, device=x.device).scatter_add_(1, cells_split, done.float()) > 0
        made = torch.zeros(B, cells, device=x.device).scatter_add_(
            1, self.child_cells[cells_split].flatten(1), done.float().repeat_interleave(4, dim=1)) > 0
        return (root | made) & ~was_split

    def level(self, boxes: torch.Tensor) -> torch.Tensor:
        """Each leaf's size class (B, L): 0 for root cells, 1 for their children, ..."""
        return torch.log2(self.sizes[0] / boxes[..., 2]).round().long()
