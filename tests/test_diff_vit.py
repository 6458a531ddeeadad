"""Differential attention: the paper's formula, timm equivalence, lambda_init per depth, seed 002 sizes."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitlab
from vitlab.layers import DiffAttention, DiffAttentionV2
from vitlab.stats import model_stats


def naive_diff_attention(attn: DiffAttention, x: torch.Tensor) -> torch.Tensor:
    """VARIANTS.md §3 written out with explicit N x N softmax maps and a loop over heads."""
    B, N, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    W = attn.qkv.weight
    q, k, v = (x @ W[i * D:(i + 1) * D].T + attn.qkv.bias[i * D:(i + 1) * D] for i in range(3))
    dot1, dot2 = float((attn.lambda_q1 @ attn.lambda_k1).detach()), float((attn.lambda_q2 @ attn.lambda_k2).detach())
    lam = (math.exp(dot1) - math.exp(dot2)
           + 0.8 - 0.6 * math.exp(-0.3 * attn.depth_index))
    heads = []
    for i in range(H):
        q1, q2 = q[..., (2 * i) * d:(2 * i + 1) * d], q[..., (2 * i + 1) * d:(2 * i + 2) * d]
        k1, k2 = k[..., (2 * i) * d:(2 * i + 1) * d], k[..., (2 * i + 1) * d:(2 * i + 2) * d]
        vi = v[..., i * 2 * d:(i + 1) * 2 * d]
        a1 = torch.softmax(q1 @ k1.transpose(-1, -2) / math.sqrt(d), dim=-1)
        a2 = torch.softmax(q2 @ k2.transpose(-1, -2) / math.sqrt(d), dim=-1)
        o = (a1 - lam * a2) @ vi  # (B, N, 2d)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.sub_norm.weight
        heads.append(o * (1 - (0.8 - 0.6 * math.exp(-0.3 * attn.depth_index))))
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("depth", [0, 3, 11])
def test_diff_attention_equals_the_formula(depth):
    torch.manual_seed(depth)
    attn = DiffAttention(48, num_heads=3, depth=depth).eval()
    attn.depth_index = depth
    with torch.no_grad():
        for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2, attn.sub_norm.weight):
            p.normal_(0, 0.5)
    x = torch.randn(2, 17, 48)
    torch.testing.assert_close(attn(x), naive_diff_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_lambda_init_per_block_and_fp32_lambda():
    m = vitlab.create_model("diff_vit_micro_patch7_28", in_chans=1, num_classes=10)
    for l, block in enumerate(m.blocks):
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * l))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.blocks[0].attn.lambda_full().dtype == torch.float32
        assert torch.isfinite(m(torch.randn(2, 1, 28, 28))).all()


@pytest.mark.parametrize("name", ["diff_vit_micro_patch7_28", "diff_vit_small_patch16_224", "vit_differential_10m"])
def test_equals_timm_diff_vit_on_copied_weights(name):
    torch.manual_seed(0)
    ours = vitlab.create_model(name, depth=2, img_size={"diff_vit_small_patch16_224": 64,
                                                         "vit_differential_10m": 56}.get(name)).eval()
    a = ours.vitlab_args
    theirs = TimmViT(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                     num_classes=a["num_classes"], embed_dim=a["embed_dim"], depth=2, num_heads=a["num_heads"],
                     mlp_ratio=a["mlp_ratio"], qkv_bias=True, attn_layer="diff").eval()
    theirs.load_state_dict(ours.state_dict())  # same keys, same shapes
    x = torch.randn(2, a["in_chans"], a["img_size"], a["img_size"])
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_half_heads_and_seed002_parameter_bands(capsys):
    m = vitlab.create_model("diff_vit_small_patch16_224", depth=1)
    assert (m.embed_dim, m.blocks[0].attn.num_heads, m.blocks[0].attn.head_dim) == (384, 3, 64)
    for proto in ("", "bach_"):
        for label, target in (("10m", 10e6), ("25m", 25e6), ("50m", 50e6)):
            classic = model_stats(f"vit_classic_{proto}{label}")["params"]
            diff = model_stats(f"vit_differential_{proto}{label}")["params"]
            assert abs(classic / target - 1) <= 0.10 and abs(diff / target - 1) <= 0.10
            assert abs(diff / classic - 1) <= 0.02
    assert vitlab.registry.resolve_name("vit_differential_25b") == "vit_differential_25m"
    assert "'25B' means ~25M parameters" in capsys.readouterr().err


def published_diff_v2(attn: DiffAttentionV2, x: torch.Tensor) -> torch.Tensor:
    """Differential attention V2 as the authors publish it (microsoft/unilm Diff-Transformer-V2,
    multihead_flashdiffv2.py; blog 2026-01-20), without causality or RoPE (a ViT): 2H query heads and G KV heads
    of size d, query head j reads KV head j // (2H / G); one softmax map per query head;
    out_i = O_2i - sigmoid(x W_lambda)_i O_2i+1; W_O over the H differences. Written with explicit maps and a
    loop over heads."""
    B, N, D = x.shape
    H, G, d = attn.num_heads, attn.kv_heads, attn.head_dim
    W, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ W[:2 * D].T + b[:2 * D]).reshape(B, N, 2 * H, d)
    k = (x @ W[2 * D:2 * D + G * d].T + b[2 * D:2 * D + G * d]).reshape(B, N, G, d)
    v = (x @ W[2 * D + G * d:].T + b[2 * D + G * d:]).reshape(B, N, G, d)
    heads = []
    for j in range(2 * H):
        g = j // (2 * H // G)
        a = torch.softmax(q[:, :, j] @ k[:, :, g].transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, N, N)
        heads.append(a @ v[:, :, g])  # (B, N, d)
    lam = torch.sigmoid(x @ attn.lambda_proj.weight.T)  # (B, N, H)
    diff = [heads[2 * i] - lam[..., i:i + 1] * heads[2 * i + 1] for i in range(H)]
    return torch.cat(diff, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (4, 1)])
def test_diff_attention_v2_equals_the_published_formula(heads, kv_heads):
    torch.manual_seed(heads + kv_heads)
    attn = DiffAttentionV2(48, num_heads=heads, kv_heads=kv_heads).double().eval()
    with torch.no_grad():
        attn.lambda_proj.weight.normal_(0, 0.5)  # lambdas away from 0.5, different per token and head
    assert attn.qkv.out_features == 2 * 48 + 2 * kv_heads * (48 // heads) and attn.proj.in_features == 48
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    torch.testing.assert_close(attn(x), published_diff_v2(attn, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 9), (2, 1, 9, 9), (2, 8, 9, 9)])
def test_diff_attention_v2_groups_query_heads_over_their_kv_head_under_any_bias(bias_shape):
    """The folded call equals one softmax per query head j over KV head j // r, with a key-only bias (token
    merging's), one per query row, or one per head."""
    torch.manual_seed(0)
    attn = DiffAttentionV2(32, num_heads=4, kv_heads=2).double()
    q, k, v = torch.randn(2, 8, 9, 8).double(), torch.randn(2, 2, 9, 8).double(), torch.randn(2, 2, 9, 8).double()
    bias = torch.randn(bias_shape).double()
    expected = torch.stack([torch.softmax(q[:, j] @ k[:, j // 4].transpose(-1, -2) / math.sqrt(8)
                                          + bias[:, min(j, bias.shape[1] - 1)], dim=-1) @ v[:, j // 4]
                            for j in range(8)], dim=1)
    torch.testing.assert_close(attn.attend(q, k, v, bias), expected, atol=1e-12, rtol=1e-12)


def test_diff_attention_v2_in_the_vit_and_the_study():
    """attn_layer='diff2' keeps the classic heads; the study's V2 sizes are the classic ones plus the doubled
    queries and lambda (D^2 + D + D H a block); kv_heads must divide the heads."""
    m = vitlab.create_model("vit_differential_v2_10m", depth=2, img_size=32)
    assert m.architecture == "diff2_vit" and m.blocks[0].attn.num_heads == 8
    classic = vitlab.create_model("vit_classic_10m", depth=2, img_size=32)
    extra = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in classic.parameters())
    assert extra == 2 * (256 * 256 + 256 + 256 * 8)  # per block: the second queries (weights, biases), lambda
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(torch.randn(2, 3, 32, 32))).all()
    with pytest.raises(vitlab.VitlabError, match="kv_heads 3 must divide num_heads 4"):
        DiffAttentionV2(32, num_heads=4, kv_heads=3)
