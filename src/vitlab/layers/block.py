"""Pre-norm transformer block (ViT, arXiv 2010.11929 eq. 2-3), with optional LayerScale (CaiT, 2103.17239).

    x = x + DropPath(LayerScale(Attn(LN(x))))
    x = x + DropPath(LayerScale(MLP(LN(x))))

Variants swap `attn_layer` / `mlp_layer` instead of copying the block. Under token merging (ToMe,
`layers/token_merge.py`) the block merges tokens between the two residuals, where the paper does. LN's epsilon is `norm_eps`: 1e-6 (ViT,
timm) unless a model reproduces an original that kept torch's 1e-5.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath
from .mlp import Mlp
from .token_merge import TokenMerging


def LayerNorm(dim: int, eps: float = 1e-6, **kwargs) -> nn.LayerNorm:
    """nn.LayerNorm with ViT's epsilon (the JAX original's and timm's, 1e-6) unless told otherwise; the
    originals built on torch's defaults (the Res-ViT project, the reversible/BDIA project, GDT-ViT) use 1e-5."""
    return nn.LayerNorm(dim, eps=eps, **kwargs)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch, initialised small (CaiT)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None, attn_layer: Callable[..., nn.Module] = Attention,
                 mlp_layer: Callable[..., nn.Module] = Mlp, norm_layer: Callable[..., nn.Module] = LayerNorm,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = norm_layer(dim, eps=norm_eps)  # norm_layer(dim, eps=...): nn.LayerNorm, nn.RMSNorm, ...
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch alone (reversible families call the two branches separately)."""
        return self.drop_path1(self.ls1(self.attn(self.norm1(x))))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor, merging: TokenMerging | None = None) -> torch.Tensor:
        if merging is None:
            x = x + self.attn_residual(x)
            return x + self.mlp_residual(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), merging)))
        x = merging.merge(x)  # (B, N, D) -> (B, N - r, D)
        return x + self.mlp_residual(x)
