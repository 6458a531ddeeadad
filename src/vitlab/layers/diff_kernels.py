"""The core of differential attention, (softmax(Q1 K1^T s) - lambda softmax(Q2 K2^T s)) V, in two kernels.

Both take q, k of shape (2, B, H, N, d) (map m of head h is q[m, :, h]), v of shape (B, H, N, 2d) and an fp32
0-d lambda, and return the (B, H, N, 2d) result in fp32 (fp64 inputs: fp64). Neither builds an N x N matrix.
The SDPA kernel also takes values of another width e, v (B, H, N, e): with the identity as values (e = N) it
returns the differential map itself (`DiffAttention.attention_map`).

* `sdpa_differential_attention`: one `scaled_dot_product_attention` call over the 2H maps. SDPA's fused
  kernels need one head size for q, k and v, so q and k are zero-padded to 2d (exact: q.k is unchanged) and each
  map gets its head's V. Dropout and every device are supported, but the attention matmuls cost 2x the classic
  layer's (both maps multiply V, at a padded width).
* `tiled_differential_attention`: an autograd Function that walks blocks of c queries. Per block it builds
  both c x N maps, takes the difference *before* multiplying V, so the matmul FLOPs equal a classic layer's at
  equal parameters, and it recomputes the maps in backward (flash-attention style) instead of saving them:
  memory is O(c N), not O(N^2). No attention dropout.

`differential_attention` picks the tiled kernel on CPU without dropout, SDPA elsewhere. On CPU the tiled kernel
takes a differential ViT's training step from 1.34x to 1.24x a classic ViT's at 785 tokens (medians of 6 runs),
and the difference grows at short sequences (`bench/diff_attention.py`). On CUDA the fused SDPA kernels stay: a
Python loop of unfused blocks would trade compute the GPU has to spare for memory traffic it does not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: queries per block of the tiled kernel: large enough for efficient GEMMs, small enough that the blocks stay in
#: cache; 64 was fastest on CPU at 17, 197 and 785 tokens and batch 2-128 (48-128 measured)
QUERY_BLOCK = 64
#: True sends every call to the SDPA kernel (`bench/diff_attention.py` times both kernels with it)
FORCE_SDPA: bool = False


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 to fp32 (the difference of two maps loses too much below it); fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sdpa_differential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                                scale: float, dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    _, B, H, N, d = q.shape
    q, k = (F.pad(t.permute(1, 2, 0, 3, 4).reshape(B, 2 * H, N, d), (0, d)) for t in (q, k))  # (B, 2H, N, 2d)
    v = v.repeat_interleave(2, dim=1)  # (B, 2H, N, 2d): maps 2h and 2h+1 read head h's values
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    a = a.view(B, H, 2, N, v.shape[-1])  # (B, H, map, N, 2d or e)
    return _wide(a[:, :, 0]) - lam * _wide(a[:, :, 1])


class _TiledDifferentialAttention(torch.autograd.Function):
    """Forward: O = (P1 - lambda P2) V with P_m = softmax(s Q_m K_m^T), one block of queries at a time.

    Backward, per block, with dA = dO V^T:
        dV += (P1 - lambda P2)^T dO
        dS_m = f_m * P_m (dA - rowsum(dA P_m)),   f_1 = 1, f_2 = -lambda   (softmax backward)
        dQ_m = s dS_m K_m,   dK_m += s dS_m^T Q_m,   dlambda -= sum(P2 * dA)
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q, k, v, lam, scale: float):
        qs, k, v = (q * scale).contiguous(), k.contiguous(), v.contiguous()  # the scale folded into q once
        _, B, H, N, d = q.shape
        bh, c = B * H, min(QUERY_BLOCK, N)
        q3 = qs.view(2 * bh, N, d)  # (map, batch, head) flattened, map-major
        kt3, v3 = k.view(2 * bh, N, d).transpose(1, 2), v.view(bh, N, 2 * d)
        neg_lam, out3 = -lam, v3.new_empty(v3.shape)
        maps, diff = _BlockBuffers(qs, bh, c, N, 2), _BlockBuffers(qs, bh, c, N, 1)
        for s in range(0, N, c):
            n = min(c, N - s)
            p = _softmax_(torch.bmm(q3[:, s:s + n], kt3, out=maps(n)))  # (2BH, n, N): both maps of n queries
            a = torch.addcmul(p[:bh], p[bh:], neg_lam, out=diff(n))  # (BH, n, N)
            torch.bmm(a, v3, out=out3[:, s:s + n])
        ctx.save_for_backward(qs, k, v, lam)
        ctx.scale = scale
        return out3.view(B, H, N, 2 * d)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dout):
        qs, k, v, lam = ctx.saved_tensors  # qs = s Q
        _, B, H, N, d = qs.shape
        bh, c, scale = B * H, min(QUERY_BLOCK, N), ctx.scale
        neg_lam = -lam
        f = torch.stack((torch.ones_like(lam), neg_lam)).to(qs.dtype).view(2, 1, 1, 1, 1)  # f_m per map
        q3 = qs.view(2 * bh, N, d)
        qf3, kf3 = (qs * f).view(2 * bh, N, d), (k * (f * scale)).view(2 * bh, N, d)  # s f_m Q_m, s f_m K_m
        kt3, vt3 = k.view(2 * bh, N, d).transpose(1, 2), v.view(bh, N, 2 * d).transpose(1, 2)
        dout3 = dout.contiguous().view(bh, N, 2 * d)
        dq3, dk3, dv3 = q3.new_empty(q3.shape), torch.zeros_like(q3), torch.zeros_like(v).view(bh, N, 2 * d)
        dlam = torch.zeros_like(lam)
        maps, grads, diff = (_BlockBuffers(qs, bh, c, N, m) for m in (2, 2, 1))
        for s in range(0, N, c):
            n = min(c, N - s)
            do = dout3[:, s:s + n]  # (BH, n, 2d)
            p = _softmax_(torch.bmm(q3[:, s:s + n], kt3, out=maps(n)))  # (2BH, n, N), recomputed
            dv3.baddbmm_(torch.addcmul(p[:bh], p[bh:], neg_lam, out=diff(n)).transpose(1, 2), do)
            da = torch.bmm(do, vt3, out=diff(n))  # (BH, n, N); the difference's buffer is free again
            dlam -= torch.vdot(p[bh:].reshape(-1), da.reshape(-1))
            g = grads(n)  # (2BH, n, N)
            for m in (slice(None, bh), slice(bh, None)):
                torch.ops.aten._softmax_backward_data.out(da, p[m], -1, p.dtype, grad_input=g[m])
            torch.bmm(g, kf3, out=dq3[:, s:s + n])
            dk3.baddbmm_(g.transpose(1, 2), qf3[:, s:s + n])
        return dq3.view(qs.shape), dk3.view(k.shape), dv3.view(v.shape), dlam, None


class _BlockBuffers:
    """One buffer per call for a (maps*BH, n, N) block, reused for every block: the loop then does not page in
    fresh memory each step (that alone cost ~15% of the kernel's time on CPU)."""

    def __init__(self, like: torch.Tensor, bh: int, c: int, N: int, maps: int):
        self.data, self.rows, self.N = like.new_empty(maps * bh * c * N), maps * bh, N

    def __call__(self, n: int) -> torch.Tensor:
        return self.data[:self.rows * n * self.N].view(self.rows, n, self.N)


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in place."""
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def tiled_differential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    return _wide(_TiledDifferentialAttention.apply(q, k, v, lam, scale))


def differential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, scale: float,
                           dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias (broadcasting to (B, H, N, N)), added to both maps' scores, takes the SDPA kernel."""
    if q.device.type == "cpu" and dropout_p == 0.0 and bias is None and not FORCE_SDPA:
        return tiled_differential_attention(q, k, v, lam, scale)
    return sdpa_differential_attention(q, k, v, lam, scale, dropout_p, bias)
