"""What tokens become for segmentation: each token predicts its box's classes on a P x P grid, painted back.

    v_i = head(fc_norm(z_i))  (K * P * P per token)  ->  resized from P x P to the token's box, written there

A patch grid's boxes tile the image, and so do a quadtree's leaves, so every pixel gets exactly one token's
prediction: per-pixel logits (B, K, H, W), trained with per-pixel cross-entropy. The Linear is the model's
`head`, as for classification.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .tokenizer import TokenSet


class SegmentHead(nn.Module):
    def __init__(self, num_prefix_tokens: int, patch_size: int, sizes: Sequence[int], img_size: int):
        super().__init__()
        self.num_prefix_tokens, self.patch_size, self.sizes, self.img_size = (num_prefix_tokens, patch_size,
                                                                              list(sizes), img_size)

    def outputs(self, num_classes: int) -> int:
        """Width of the model's Linear head: a P x P grid of logits per class."""
        return num_classes * self.patch_size ** 2

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """(B, prefix + T, D) -> every token but the prefix (B, T, D)."""
        return z[:, self.num_prefix_tokens:]

    def decode(self, y: torch.Tensor, tokens: TokenSet | None) -> torch.Tensor:
        """(B, T, K*P*P) -> per-pixel logits (B, K, H, W)."""
        if tokens is None:
            raise VitlabError("a segmentation head paints each token into its box: pass the TokenSet the tokens "
                              "came from (model.forward does)")
        P = self.patch_size
        values = y.unflatten(-1, (-1, P, P))  # (B, T, K, P, P)
        return paint(values, tokens.boxes, self.sizes, self.img_size, mode="bilinear")


def paint(values: torch.Tensor, boxes: torch.Tensor, sizes: Sequence[int], image_size: int,
          mode: str = "nearest") -> torch.Tensor:
    """Per-leaf predictions back into their boxes (the inverse of leaf extraction, the GDT-ViT project's "deserialize"):
    values (B, T, K, c, c), a c x c grid per leaf; boxes (B, T, 3) as (x, y, size), each size one of `sizes`
    (size 0: padding, painted nowhere) -> (B, K, H, W). One scatter per leaf size, none per leaf: every leaf
    is resized to that size and the ones of another size write to a spare pixel."""
    B, T, K, c = values.shape[:4]
    H = image_size
    out = values.new_zeros(B, K, H * H + 1)  # the last pixel takes the writes of leaves of other sizes
    xy, size = boxes[..., :2].long(), boxes[..., 2]
    for s in sizes:
        v = values.reshape(B * T, K, c, c)
        v = v if s == c else F.interpolate(v, size=(s, s), mode=mode)
        v = v.reshape(B, T, K, s * s).permute(0, 2, 1, 3).reshape(B, K, T * s * s)
        r, q = torch.meshgrid(torch.arange(s, device=values.device), torch.arange(s, device=values.device),
                              indexing="ij")
        pixel = (xy[..., 1:] + r.reshape(1, 1, -1)) * H + xy[..., :1] + q.reshape(1, 1, -1)  # (B, T, s*s)
        pixel = torch.where((size == s)[..., None], pixel, H * H)
        out.scatter_(2, pixel.reshape(B, 1, -1).expand(B, K, -1), v)
    return out[..., :H * H].reshape(B, K, H, H)
