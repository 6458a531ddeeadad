"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461).

Inside each block, between attention and the MLP, r tokens are merged away by bipartite soft matching:

1. the tokens are split alternately into A (even positions) and B (odd positions);
2. each token a in A finds its most similar b in B, by the cosine similarity of their attention keys (averaged
   over heads); the class token is never merged;
3. the r pairs that are most alike merge. b becomes the size-weighted mean of itself and of the a's merged
   into it, and the other tokens of A stay as they are.

Each token's size s counts the patches it stands for. Proportional attention adds log s to every attention
score, so a merged token weighs as much as the tokens it replaced. After the last block, `unmerge` gives each
original token its group's vector again, so the head (class token, mean pooling or segmentation) reads the
same layout as without merging. The mean of the unmerged tokens is the size-weighted mean of the merged ones.
At r = 0 nothing changes.

The matching runs without gradient (as in the paper); the merge itself is differentiable, so a model can be
fine-tuned with merging on. There is no per-token or per-image Python loop: the matching is one batched
similarity matrix, a max, an argsort and a few gathers and scatters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import VitlabError


def merge_schedule(merge: int | Sequence[int] | None, depth: int) -> list[int]:
    """`model.merge` as tokens to merge away in each block: an int r is r in every block (ToMe's constant
    schedule); a list gives one r per block, and missing entries mean 0."""
    if merge is None:
        return [0] * depth
    rs = [merge] * depth if isinstance(merge, int) else list(merge) if isinstance(merge, (list, tuple)) else [merge]
    if len(rs) > depth or any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in rs):
        raise VitlabError(f"model.merge must be a whole number of tokens >= 0, or a list of at most {depth} "
                          f"(one per block), got {merge!r}")
    return rs + [0] * (depth - len(rs))


class Matching:
    """One block's bipartite soft matching of r tokens of A into B, applied to any (B, N, C) tensor."""

    def __init__(self, metric: torch.Tensor, r: int, protected: int):
        with torch.no_grad():
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a, b = metric[:, ::2], metric[:, 1::2]
            scores = a @ b.transpose(1, 2)  # (B, |A|, |B|) cosine similarities
            scores[:, :protected] = -torch.inf  # the class token (first of A) never merges
            best, best_b = scores.max(dim=-1)  # (B, |A|): each a's closest b
            order = best.argsort(dim=-1, descending=True)  # the most alike pairs first
            self.src = order[:, :r]  # (B, r): the a's merged away
            self.dst = best_b.gather(1, self.src)  # (B, r): the b each of them joins
            self.keep = order[:, r:].sort(dim=-1).values  # (B, |A| - r): the rest of A, in their order
        self.r = r

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): [kept A; B] with each merged a *added* to its b (a sum: weight first)."""
        xa, xb = x[:, ::2], x[:, 1::2]
        C = x.shape[-1]
        kept = xa.gather(1, self.keep[..., None].expand(-1, -1, C))
        moved = xa.gather(1, self.src[..., None].expand(-1, -1, C))
        xb = xb.scatter_add(1, self.dst[..., None].expand(-1, -1, C), moved)
        return torch.cat([kept, xb], dim=1)

    def slots(self, n: int) -> torch.Tensor:
        """(B, n) long: the slot each of the n tokens before the merge has after it."""
        B, kept = self.keep.shape
        slot_a = torch.empty(B, (n + 1) // 2, dtype=torch.long, device=self.keep.device)
        slot_a.scatter_(1, self.keep, torch.arange(kept, device=self.keep.device).expand(B, -1))
        slot_a.scatter_(1, self.src, kept + self.dst)
        slot = torch.empty(B, n, dtype=torch.long, device=self.keep.device)
        slot[:, ::2] = slot_a
        slot[:, 1::2] = kept + torch.arange(n // 2, device=self.keep.device)
        return slot


class TokenMerging:
    """The merging state of one forward pass: the schedule, each token's size and where each original token
    went. Blocks call `observe` (from attention: the keys), `attn_bias` (proportional attention) and `merge`."""

    def __init__(self, schedule: Sequence[int], num_tokens: int, protected: int, proportional: bool = True):
        if protected not in (0, 1):
            raise ValueError("token merging protects at most one prefix token (the class token)")
        self.schedule, self.protected, self.proportional = list(schedule), protected, proportional
        self.layer = 0
        self.num_tokens = num_tokens  # N0, before any merge
        self.size: torch.Tensor | None = None  # (B, N, 1): patches per token; None while every size is 1
        self.source: torch.Tensor | None = None  # (B, N0) long: each original token's current slot
        self.metric: torch.Tensor | None = None

    def observe(self, keys: torch.Tensor) -> None:
        """Attention's keys (B, H, N, d) -> the similarity metric (B, N, d): their mean over heads."""
        self.metric = keys.mean(dim=1)

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """log(size) added to every score (B, 1, 1, N), so a token counts as the patches it stands for."""
        if self.size is None or not self.proportional:
            return None
        return self.size.log().to(dtype).transpose(1, 2)[:, None]  # (B, N, 1) -> (B, 1, 1, N)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """This block's merge of x (B, N, D) -> (B, N - r, D), the size-weighted mean of each merged group."""
        r = min(self.schedule[self.layer], (x.shape[1] - self.protected) // 2)
        self.layer += 1
        if r <= 0:
            return x
        if self.metric is None:
            raise RuntimeError("TokenMerging.merge before the attention observed the keys")
        match = Matching(self.metric, r, self.protected)
        B, N, _ = x.shape
        size = self.size if self.size is not None else x.new_ones(B, N, 1)
        x = match(x * size)
        self.size = match(size)
        x = x / self.size
        source = self.source if self.source is not None else torch.arange(N, device=x.device).expand(B, -1)
        self.source = match.slots(N).gather(1, source)
        self.metric = None
        return x

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N0, C): each original token gets the vector of the group it was merged into."""
        if self.source is None:
            return x
        return x.gather(1, self.source[..., None].expand(-1, -1, x.shape[-1]))
