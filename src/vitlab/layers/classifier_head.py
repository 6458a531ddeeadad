"""What tokens become for classification: one vector per image, then the model's Linear `head` to classes.

    y = head(fc_norm(z_cls))               pool='token': the class token (ViT eq. 4)
    y = head(fc_norm(mean_i z_i))          pool='avg': the mean of the other tokens

The head module holds no weights: the Linear stays the model's `head`, and the norms its `norm` / `fc_norm`,
so state-dict keys stay timm's.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .tokenizer import TokenSet


class ClassifierHead(nn.Module):
    def __init__(self, pool: Literal["token", "avg"], num_prefix_tokens: int):
        super().__init__()
        self.pool_kind, self.num_prefix_tokens = pool, num_prefix_tokens

    def outputs(self, num_classes: int) -> int:
        """Width of the model's Linear head: one logit per class."""
        return num_classes

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """(B, prefix + T, D) -> (B, D)."""
        return z[:, self.num_prefix_tokens:].mean(dim=1) if self.pool_kind == "avg" else z[:, 0]

    def decode(self, y: torch.Tensor, tokens: TokenSet | None) -> torch.Tensor:
        """The Linear's output is already the logits (B, classes)."""
        return y
