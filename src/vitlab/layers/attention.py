"""Multi-head self-attention (Vaswani et al. 2017) through `scaled_dot_product_attention`, and Locality
Self-Attention (Lee et al., arXiv 2112.13492) as a subclass that changes only the scores.

One fused Linear(D, 3D) produces q, k and v; SDPA picks the fastest kernel for the device (flash or
memory-efficient on CUDA, a fused C++ kernel on CPU). Parameter names (`qkv`, `proj`) match timm.
Under token merging (`layers/token_merge.py`) the layer shows the merger its keys and adds the proportional
attention bias log(size) to the scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .token_merge import TokenMerging


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise VitlabError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; "
                              f"set model.embed_dim to a multiple of model.num_heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v over (B, H, N, d) tensors (bias broadcasts to (B, H, N, N))."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=self.attn_drop if self.training else 0.0)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of tokens x (B, N, D), each (B, H, N, d)."""
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N): the weight each query gives each key, i.e. what `attend` multiplies V by, read off by
        attending over the identity as values (attention is linear in V), so a subclass's scores count too."""
        q, k, _ = self.heads(x)
        B, H, N, _ = q.shape
        return self.attend(q, k, torch.eye(N, dtype=q.dtype, device=q.device).expand(B, H, N, N))

    def forward(self, x: torch.Tensor, merging: TokenMerging | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.heads(x)  # each (B, H, N, d)
        bias = None
        if merging is not None:
            merging.observe(k)
            bias = merging.attn_bias(q.dtype)
        x = self.attend(q, k, v, bias).transpose(1, 2).reshape(B, N, D)  # (B, N, H*d)
        return self.proj_drop(self.proj(x))


class LocalitySelfAttention(Attention):
    """LSA (arXiv 2112.13492, eq. 4-5): softmax(mask(q k^T * exp(t))) v with a learned temperature
    t (initialised at log(1/sqrt(d)), the usual scale) and the diagonal masked, so a token attends only to
    the others and the sharper, learned temperature lets attention stay local on small datasets."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.head_dim ** -0.5)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        N = q.shape[-2]
        mask = ~torch.eye(N, dtype=torch.bool, device=q.device)  # True: may attend
        if bias is not None:  # additive: -inf on the diagonal, the bias elsewhere
            mask = bias.masked_fill(~mask, -torch.inf)
        return F.scaled_dot_product_attention(q * self.log_temperature.exp().to(q.dtype), k, v,
                                              attn_mask=mask, scale=1.0,
                                              dropout_p=self.attn_drop if self.training else 0.0)
