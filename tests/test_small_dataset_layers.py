"""Shifted Patch Tokenization and Locality Self-Attention (Lee et al., arXiv 2112.13492) against the paper's
formulas, as swaps of any family, and seed 003's names built with them."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import LocalitySelfAttention, ShiftedPatchEmbed


def shift(x, dy, dx):
    """The image moved by (dy, dx) pixels, zeros where nothing moved in (the paper's spatial shift)."""
    out = torch.zeros_like(x)
    H, W = x.shape[-2:]
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[..., max(-dy, 0):H - max(dy, 0),
                                                                        max(-dx, 0):W - max(dx, 0)]
    return out


def test_spt_is_layernorm_linear_of_the_image_and_its_four_diagonal_half_patch_shifts():
    torch.manual_seed(0)
    spt = ShiftedPatchEmbed(img_size=8, patch_size=4, in_chans=3, embed_dim=16)
    x = torch.randn(2, 3, 8, 8)
    s = 2  # half a patch
    stacked = torch.cat([x, shift(x, -s, -s), shift(x, -s, s), shift(x, s, -s), shift(x, s, s)], dim=1)  # (2, 15, 8, 8)
    patches = F.unfold(stacked, kernel_size=4, stride=4).transpose(1, 2)  # (2, 4, 15*16): (c, row, col) order
    expected = spt.proj(F.layer_norm(patches, (patches.shape[-1],), spt.norm.weight, spt.norm.bias))
    torch.testing.assert_close(spt(x), expected)
    # a token sees half a patch beyond its own border: the top-left token changes when pixel (5, 5) does
    x2 = x.clone()
    x2[..., 5, 5] += 1
    assert not torch.allclose(spt(x2)[:, 0], spt(x)[:, 0])


def test_lsa_is_masked_softmax_with_a_learned_temperature():
    torch.manual_seed(0)
    lsa = LocalitySelfAttention(dim=16, num_heads=2, qkv_bias=False).eval()
    assert lsa.qkv.bias is None
    assert lsa.log_temperature.item() == pytest.approx(math.log(8 ** -0.5))  # the usual scale at start
    with torch.no_grad():
        lsa.log_temperature.fill_(0.3)
    x = torch.randn(3, 5, 16)
    q, k, v = lsa.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) * math.exp(0.3)
    scores = scores.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))  # no token attends to itself
    attn = scores.softmax(-1)
    assert torch.all(attn.diagonal(dim1=-2, dim2=-1) == 0)
    expected = lsa.proj((attn @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(lsa(x), expected)
    lsa(x).sum().backward()
    assert lsa.log_temperature.grad is not None and lsa.log_temperature.grad.abs() > 0  # it is learned


@pytest.mark.parametrize("family", ["vit", "rev_vit", "bdia_vit", "momentum_vit", "diff_vit"])
def test_spt_is_a_swap_of_any_family(family):
    model = vitlab.create_model(f"{family}_micro_patch4_28", depth=2, in_chans=1, patch_embed="spt",
                                attn_layer="lsa" if family != "diff_vit" else "diff").train()
    assert isinstance(model.patch_embed, ShiftedPatchEmbed)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["vit_small", "vit_small_reverse", "vit_small_bdia", "vit_small_momentum"])
def test_seed003_names_are_the_seeds_architecture(name):
    model = vitlab.create_model(name, depth=2, img_size=28, num_classes=7, in_chans=1).train()
    assert isinstance(model.patch_embed, ShiftedPatchEmbed)
    assert all(isinstance(b.attn, LocalitySelfAttention) and b.attn.qkv.bias is None for b in model.blocks)
    assert len(model.blocks) == 2 and model.embed_dim == 512 and model.patch_embed.patch_size == 4
    assert model.blocks[0].mlp.fc1.out_features == 512  # MLP width 512 (ratio 1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    plain = vitlab.create_model(name, depth=2, patch_embed="patch", attn_layer="mhsa", qkv_bias=True)
    assert type(plain.patch_embed).__name__ == "PatchEmbed"  # the plain-layer versions stay available
