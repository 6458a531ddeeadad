"""Stochastic depth (Huang et al. 2016, arXiv 1603.09382): drop a whole residual branch per sample."""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)  # rescale so the expectation is unchanged

    def extra_repr(self) -> str:
        return f"p={self.p}"
