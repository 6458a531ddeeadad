"""Differential attention (Ye et al., "Differential Transformer", arXiv 2410.05258, eq. 1-3), for ViTs.

With H heads (half a standard layer's, so parameters match) and d = D / (2H):

    [Q1; Q2] = X W_Q,  [K1; K2] = X W_K   (2H sub-heads of size d; head i owns sub-heads 2i and 2i+1)
    V = X W_V                              (H heads of size 2d)
    DiffAttn_i = (softmax(Q1 K1^T / sqrt d) - lambda softmax(Q2 K2^T / sqrt d)) V_i
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 l)
    out = W_O concat_i[(1 - lambda_init) RMSNorm(DiffAttn_i)]

l is the 0-based block index. The bracket comes from `diff_kernels.differential_attention`: on CPU a
tiled kernel that subtracts the maps before multiplying V (classic-layer FLOPs), elsewhere one fused
`scaled_dot_product_attention` call over the 2H maps; neither builds an N x N matrix. lambda, the
difference of the two maps and the RMSNorm run in fp32 (bf16-safe). Parameter names match timm's
`DiffAttention` (`qkv`, `lambda_q1/k1/q2/k2`, `sub_norm`, `proj`), so weights interchange with timm's
`VisionTransformer(attn_layer='diff')`.

Differential attention V2 (Ye, Dong, Sun, Wei, "Differential Transformer V2", Jan 2026: the authors' blog
https://huggingface.co/blog/microsoft/diff-attn-v2 and microsoft/unilm Diff-Transformer-V2/
multihead_flashdiffv2.py), `DiffAttentionV2`, with H heads of size d = D / H as the classic layer and G KV heads:

    Q = X W_Q   (2H heads of size d),   K = X W_K, V = X W_V   (G heads of size d; query head j reads KV head
                                                                 j // (2H / G), so heads 2i and 2i+1 share one)
    O_j = softmax(Q_j K_g(j)^T / sqrt d) V_g(j)       (one attention call over the 2H query heads)
    lambda = sigmoid(X W_lambda)                      (B, N, H): per token, per head
    C_i = O_2i - lambda_i * O_2i+1
    out = W_O concat_i C_i                            (W_O: D -> D, the classic layer's)

No lambda_init, no sub-layer norm, no rescaling; the subtracted maps are adjacent heads of one GQA group (the
authors mark "first half minus second half" as wrong).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from .diff_kernels import differential_attention, sdpa_differential_attention
from .token_merge import TokenMerging


def lambda_init_for(depth: int) -> float:
    """The paper's lambda_init schedule over (0-based) block index."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DiffAttention(nn.Module):
    per_depth = True  # the ViT passes the block index (lambda_init depends on it)

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, depth: int = 0):
        super().__init__()
        if dim % (2 * num_heads):
            raise VitlabError(f"differential attention splits each of {num_heads} heads in two: embed_dim {dim} "
                              f"must be divisible by 2 x num_heads = {2 * num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads // 2  # d, the size of a Q/K sub-head
        self.attn_drop = attn_drop
        self.lambda_init = lambda_init_for(depth)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.empty(self.head_dim)) for _ in range(4))
        self.sub_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.reset_lambda()

    @torch.no_grad()
    def reset_lambda(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def lambda_full(self) -> torch.Tensor:
        """The layer's scalar lambda, in fp32 whatever the autocast dtype."""
        dot1 = (self.lambda_q1.float() * self.lambda_k1.float()).sum()
        dot2 = (self.lambda_q2.float() * self.lambda_k2.float()).sum()
        return torch.exp(dot1) - torch.exp(dot2) + self.lambda_init

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (2, B, H, N, d): map, head; v (B, H, N, 2d)."""
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = (t.reshape(B, N, H, 2, d).permute(3, 0, 2, 1, 4) for t in (q, k))
        return q, k, v.reshape(B, N, H, 2 * d).transpose(1, 2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N): softmax(Q1 K1^T s) - lambda softmax(Q2 K2^T s) per head, what multiplies V (before the
        sub-norm); rows sum to 1 - lambda and may hold negative weights. Read off over the identity as values."""
        q, k, _ = self.heads(x)
        _, B, H, N, _ = q.shape
        eye = torch.eye(N, dtype=q.dtype, device=q.device).expand(B, H, N, N)
        return sdpa_differential_attention(q, k, eye, self.lambda_full(), self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, merging: TokenMerging | None = None) -> torch.Tensor:
        B, N, D = x.shape
        d = self.head_dim
        q, k, v = self.heads(x)  # (2, B, H, N, d) x 2, (B, H, N, 2d)
        bias = None
        if merging is not None:  # token merging: keys of both maps as the metric, log(size) on both maps
            merging.observe(k.transpose(0, 1).flatten(1, 2))  # (B, 2H, N, d)
            bias = merging.attn_bias(q.dtype)
        out = differential_attention(q, k, v, self.lambda_full(), d ** -0.5,
                                     self.attn_drop if self.training else 0.0, bias)  # (B, H, N, 2d), fp32
        out = (self.sub_norm(out) * (1.0 - self.lambda_init)).to(v.dtype)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, H*2d)
        return self.proj_drop(self.proj(out))


class DiffAttentionV2(nn.Module):
    """Differential attention V2 (see the module docstring): the classic layer's heads and output projection,
    twice the query heads, `kv_heads` KV heads (default: `num_heads`, so each pair of query heads shares one),
    and a per-token, per-head lambda = sigmoid(Linear(D, H, no bias)). Plain SDPA, no custom kernel.

    Where it differs from the authors' (language-model) code, it follows the ViT around it: q/k/v and the
    output projection have biases (`qkv_bias`, as the classic layer), attention dropout is available, there is
    no causal mask or RoPE (the ViT's positions are added to the tokens), and the lambda projection starts
    as every Linear of the ViT (truncated normal, std 0.02: lambda ~ 0.5) instead of torch's default.
    `kv_heads` < `num_heads` (grouped KV) is a constructor argument for code that builds the layer; the
    `model.attn_layer=diff2` option uses `num_heads` KV heads."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kv_heads: int | None = None):
        super().__init__()
        kv_heads = num_heads if kv_heads is None else kv_heads
        if dim % num_heads:
            raise VitlabError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; "
                              f"set model.embed_dim to a multiple of model.num_heads")
        if kv_heads < 1 or num_heads % kv_heads:
            raise VitlabError(f"differential attention V2 pairs query heads inside KV groups: kv_heads {kv_heads} "
                              f"must divide num_heads {num_heads}")
        self.num_heads, self.kv_heads = num_heads, kv_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        # [Q (2H heads); K (G heads); V (G heads)] in one Linear
        self.qkv = nn.Linear(dim, 2 * dim + 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.lambda_proj = nn.Linear(dim, num_heads, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q_j k_g^T / sqrt(d) + bias) v_g for query heads q (B, 2H, N, d), KV heads k (B, G, N, d) and
        v (B, G, N, e) (e = d; the identity's N for `attention_map`),
        head j reading KV head g = j // r (r = 2H / G). A group's r query heads are consecutive, so they fold into
        its sequence axis: one SDPA call, each KV head read once (SDPA's own enable_gqa needs torch 2.5). `bias`
        broadcasts to (B, 2H, N, N); a key-only one (B, 1, 1, N), as token merging's, broadcasts as it is."""
        B, G, N, d = k.shape
        if bias is not None and bias.shape[-2] != 1:  # rows per query: lay them out as the folded queries
            bias = bias.expand(B, q.shape[1], N, N).reshape(B, G, -1, N)
        o = F.scaled_dot_product_attention(q.reshape(B, G, -1, d), k, v, attn_mask=bias,  # (B, G, r*N, d)
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return o.reshape(B, q.shape[1], N, v.shape[-1])  # (B, 2H, N, e)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, 2H, N, d); k, v (B, G, N, d)."""
        B, N, D = x.shape
        G, d = self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([2 * D, G * d, G * d], dim=-1)
        return q.reshape(B, N, -1, d).transpose(1, 2), *(t.reshape(B, N, G, d).transpose(1, 2) for t in (k, v))

    def differ(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """O_2i - lambda_i(x) O_2i+1 for the query heads' outputs o (B, 2H, N, e): (B, H, N, e), lambda and the
        difference in fp32 under bf16."""
        wide = torch.promote_types(o.dtype, torch.float32)
        lam = torch.sigmoid(self.lambda_proj(x).to(wide)).transpose(1, 2).unsqueeze(-1)  # (B, H, N, 1)
        return (o[:, 0::2].to(wide) - lam * o[:, 1::2].to(wide)).to(o.dtype)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N): P_2i - lambda_i P_2i+1 per head, what multiplies V; rows sum to 1 - lambda (per token)
        and may hold negative weights. Read off over the identity as values."""
        q, k, _ = self.heads(x)
        B, G, N, _ = k.shape
        return self.differ(x, self.attend(q, k, torch.eye(N, dtype=q.dtype, device=q.device).expand(B, G, N, N)))

    def forward(self, x: torch.Tensor, merging: TokenMerging | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.heads(x)  # (B, 2H, N, d), (B, G, N, d) x 2
        bias = None
        if merging is not None:  # token merging: the KV heads' keys as the metric
            merging.observe(k)
            bias = merging.attn_bias(q.dtype)
        out = self.differ(x, self.attend(q, k, v, bias))  # (B, H, N, d): pairs 2i, 2i+1
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, H*d)
        return self.proj_drop(self.proj(out))
