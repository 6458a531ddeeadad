"""The two differential-attention kernels: the formula, gradients, dispatch, bf16, and O(c N) memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitlab.layers import DiffAttention, diff_kernels
from vitlab.layers.diff_kernels import (QUERY_BLOCK, differential_attention, sdpa_differential_attention,
                                        tiled_differential_attention)


def naive(q, k, v, lam, scale):
    """(softmax(Q1 K1^T s) - lambda softmax(Q2 K2^T s)) V with explicit N x N maps."""
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (2, B, H, N, N)
    return (p[0] - lam * p[1]) @ v


def inputs(B=2, H=3, N=37, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, B, H, N, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, N, 2 * d, generator=g, dtype=dtype)
    lam = torch.tensor(0.37, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, lam)]


def grads(fn, args, scale):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*args, scale)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return [out.detach()] + [a.grad for a in args]


def test_tiled_kernel_gradcheck_across_query_blocks(monkeypatch):
    monkeypatch.setattr(diff_kernels, "QUERY_BLOCK", 16)  # blocks of 16 + 4 queries
    q, k, v, lam = inputs(B=1, H=2, N=20, d=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: tiled_differential_attention(*a, 0.4), (q, k, v, lam))


@pytest.mark.parametrize("kernel", [tiled_differential_attention, sdpa_differential_attention])
def test_kernels_equal_the_formula_with_gradients(kernel, monkeypatch):
    monkeypatch.setattr(diff_kernels, "QUERY_BLOCK", 10)  # blocks of 10, 10, 10 and 7 queries
    args = inputs()
    for got, want in zip(grads(kernel, args, 8 ** -0.5), grads(naive, args, 8 ** -0.5)):
        torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)


def test_dispatch_tiled_on_cpu_sdpa_for_dropout(monkeypatch):
    calls = []
    for name in ("tiled_differential_attention", "sdpa_differential_attention"):
        kernel = getattr(diff_kernels, name)
        monkeypatch.setattr(diff_kernels, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    q, k, v, lam = inputs()
    plain = differential_attention(q, k, v, lam, 0.3)
    torch.manual_seed(0)
    dropped = differential_attention(q, k, v, lam, 0.3, dropout_p=0.5)
    assert calls == ["tiled_differential_attention", "sdpa_differential_attention"]
    assert not torch.allclose(dropped, plain)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = DiffAttention(32, num_heads=2, attn_drop=0.5)
    x = torch.randn(2, 9, 32)
    first, second = attn(x), attn(x)
    assert not torch.allclose(first, second)  # a fresh dropout mask per call (SDPA kernel)
    (first + second).sum().backward()
    assert all(p.grad is not None for p in attn.parameters())
    attn.eval()
    no_drop = DiffAttention(32, num_heads=2).eval()
    no_drop.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x), no_drop(x))  # eval: no dropout, the tiled kernel


def test_bf16_autocast_runs_the_kernel_in_fp32():
    q, k, v, lam = inputs(N=50)
    want = naive(q.double(), k.double(), v.double(), lam.double(), 0.35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = differential_attention(q, k, v, lam, 0.35)
        out.sum().backward()
    assert out.dtype == torch.float32 and q.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)  # fp32 accuracy, not bf16's 1e-2


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_tiled_kernel_memory_is_linear_in_tokens():
    """No N x N map, forward or backward: the largest tensor is one block of both maps, 2 x B H x 64 x N."""
    B, H, N = 2, 2, 1024
    q, k, v, lam = inputs(B=B, H=H, N=N, d=4)
    with LargestTensor() as largest:
        tiled_differential_attention(q, k, v, lam, 0.5).sum().backward()
    assert largest.numel == 2 * B * H * QUERY_BLOCK * N == B * H * N * N // 8


@pytest.mark.slow
def test_torch_compile_traces_the_tiled_kernel():
    """`train.compile: true` on CPU: dynamo traces the autograd Function; same logits and lambda gradients."""
    import vitlab

    torch.manual_seed(0)
    model = vitlab.create_model("diff_vit_micro_patch7_28", in_chans=1, num_classes=10, depth=2)
    x = torch.randn(4, 1, 28, 28)
    eager = model(x)
    eager.sum().backward()
    want = [b.attn.lambda_q1.grad.clone() for b in model.blocks]
    model.zero_grad()
    compiled = torch.compile(model)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for b, g in zip(model.blocks, want):
        torch.testing.assert_close(b.attn.lambda_q1.grad, g, atol=1e-5, rtol=1e-4)
