"""Fidelity to the originals: each layer against the formula as the original project's code writes it.

- Shifted Patch Tokenization: `spt` as vit-pytorch's `vit_for_small_dataset.SPT` (what the reversible/BDIA
  project's `vit_small` uses: one-pixel shifts by F.pad), `spt_paper` as the paper's official code
  (aanna0701/SPT_LSA_ViT `models/SPT.py`: half-patch diagonal crops of the padded image); both flatten a
  patch as `Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`.
- `sincos_2d` in float64 against a float64 formula.
- LayerNorm epsilon: 1e-6 by default (timm), 1e-5 (torch's default) when asked.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import Block, LayerNorm, ShiftedPatchEmbed
from vitlab.layers.diff_attention import DiffAttention
from vitlab.layers.patch_embed import PATCH_EMBEDS
from vitlab.layers.pos_embed import sincos_2d


def rearrange_p1_p2_c(x, p):
    """einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', written out."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def vit_pytorch_spt(x, p, norm, proj):
    """vit-pytorch `vit_for_small_dataset.SPT.forward`, as the reversible/BDIA project's `models/vit_small.py`
    copies it."""
    shifts = ((1, -1, 0, 0), (-1, 1, 0, 0), (0, 0, 1, -1), (0, 0, -1, 1))
    shifted_x = [F.pad(x, shift) for shift in shifts]
    x_with_shifts = torch.cat((x, *shifted_x), dim=1)
    return proj(norm(rearrange_p1_p2_c(x_with_shifts, p)))


def paper_spt(x, p, norm, proj):
    """aanna0701/SPT_LSA_ViT `models/SPT.py`: PatchShifting (4 diagonal directions) then `merging`."""
    s = int(p * (1 / 2))
    x_pad = F.pad(x, (s, s, s, s))
    x_lu = x_pad[:, :, :-s * 2, :-s * 2]
    x_ru = x_pad[:, :, :-s * 2, s * 2:]
    x_lb = x_pad[:, :, s * 2:, :-s * 2]
    x_rb = x_pad[:, :, s * 2:, s * 2:]
    x_cat = torch.cat([x, x_lu, x_ru, x_lb, x_rb], dim=1)
    return proj(norm(rearrange_p1_p2_c(x_cat, p)))


def spt_with_random_affine(name, img, p, c, d):
    torch.manual_seed(0)
    spt = PATCH_EMBEDS[name](img, p, c, d)
    with torch.no_grad():  # a non-trivial LayerNorm affine, so a permuted layout could not pass
        spt.norm.weight.normal_()
        spt.norm.bias.normal_()
    return spt


@pytest.mark.parametrize("p,c", [(4, 3), (2, 1), (7, 1)])
def test_spt_is_vit_pytorchs_one_pixel_axis_shifts(p, c):
    spt = spt_with_random_affine("spt", 4 * p, p, c, 16)
    assert type(spt) is ShiftedPatchEmbed and spt.shifts == "axis" and spt.shift == 1
    x = torch.randn(2, c, 4 * p, 4 * p)
    torch.testing.assert_close(spt(x), vit_pytorch_spt(x, p, spt.norm, spt.proj))
    # the copies: the image moved one pixel right, left, down and up, zero-filled
    s = spt.shifted(x).unflatten(1, (5, c))
    assert torch.equal(s[:, 1, :, :, 1:], x[..., :-1]) and torch.all(s[:, 1, :, :, 0] == 0)
    assert torch.equal(s[:, 2, :, :, :-1], x[..., 1:]) and torch.all(s[:, 2, :, :, -1] == 0)
    assert torch.equal(s[:, 3, :, 1:], x[:, :, :-1]) and torch.all(s[:, 3, :, 0] == 0)
    assert torch.equal(s[:, 4, :, :-1], x[:, :, 1:]) and torch.all(s[:, 4, :, -1] == 0)


@pytest.mark.parametrize("p,c", [(4, 3), (2, 1), (8, 3)])
def test_spt_paper_is_the_papers_half_patch_diagonal_shifts(p, c):
    spt = spt_with_random_affine("spt_paper", 4 * p, p, c, 16)
    assert isinstance(spt, ShiftedPatchEmbed) and spt.shifts == "diagonal" and spt.shift == p // 2
    x = torch.randn(2, c, 4 * p, 4 * p)
    torch.testing.assert_close(spt(x), paper_spt(x, p, spt.norm, spt.proj))
    # a token sees half a patch beyond its border: the top-left token changes when pixel (P + P/2 - 1)^2 does
    x2 = x.clone()
    x2[..., p + p // 2 - 1, p + p // 2 - 1] += 1
    assert not torch.allclose(spt(x2)[:, 0], spt(x)[:, 0])
    x3 = x.clone()
    x3[..., p + p // 2, p + p // 2] += 1
    torch.testing.assert_close(spt(x3)[:, 0], spt(x)[:, 0])  # ... and no further


def test_spt_patterns_are_one_class_and_unknown_patterns_fail():
    assert PATCH_EMBEDS["spt"] is ShiftedPatchEmbed and PATCH_EMBEDS["spt_paper"].func is ShiftedPatchEmbed
    with pytest.raises(ValueError, match="unknown shift pattern"):
        ShiftedPatchEmbed(8, 4, 3, 16, shifts="cardinal")


def test_spt_matches_vit_pytorch_with_copied_weights():
    vit_small = pytest.importorskip("vit_pytorch.vit_for_small_dataset")
    torch.manual_seed(0)
    theirs = vit_small.SPT(dim=32, patch_size=4, channels=3)
    with torch.no_grad():
        theirs.to_patch_tokens[1].weight.normal_()
        theirs.to_patch_tokens[1].bias.normal_()
    ours = ShiftedPatchEmbed(32, 4, 3, 32)
    # their keys map one to one: to_patch_tokens.1 -> norm, to_patch_tokens.2 -> proj
    ours.load_state_dict({k.replace("to_patch_tokens.1", "norm").replace("to_patch_tokens.2", "proj"): v
                          for k, v in theirs.state_dict().items()})
    assert ours.norm.eps == theirs.to_patch_tokens[1].eps
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_sincos_2d_computes_in_float64_for_float64_coords():
    dim = 64
    coords = torch.rand(3, 7, 2, dtype=torch.float64) * 1000  # pixel coordinates: large arguments
    code = sincos_2d(coords, dim)
    assert code.dtype == torch.float64
    expected = torch.empty(3, 7, dim, dtype=torch.float64)
    for j in range(dim // 4):
        w = 10000.0 ** (-2.0 * j / (dim / 2))  # a Python float: double precision
        expected[..., j] = torch.sin(coords[..., 0] * w)
        expected[..., dim // 4 + j] = torch.cos(coords[..., 0] * w)
        expected[..., dim // 2 + j] = torch.sin(coords[..., 1] * w)
        expected[..., 3 * dim // 4 + j] = torch.cos(coords[..., 1] * w)
    torch.testing.assert_close(code, expected, rtol=0, atol=1e-12)
    # the float32 code is only ~1e-5 close at these coordinates: float64 is not a cast of it
    assert (sincos_2d(coords.float(), dim).double() - expected).abs().max() > 1e-9
    assert math.isclose(code[0, 0, 0].item(), math.sin(coords[0, 0, 0].item()), abs_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_sincos_2d_computes_low_precision_and_integer_coords_in_float32(dtype):
    coords = torch.tensor([[3, 5], [100, 7]]).to(dtype)
    code = sincos_2d(coords, 16)
    assert code.dtype == torch.float32
    torch.testing.assert_close(code, sincos_2d(coords.float(), 16))


def test_layernorm_eps_defaults_to_timms_and_takes_torchs():
    assert LayerNorm(8).eps == 1e-6
    assert LayerNorm(8, eps=1e-5).eps == 1e-5
    block = Block(16, 2)
    assert block.norm1.eps == block.norm2.eps == 1e-6
    block = Block(16, 2, norm_eps=1e-5)
    assert block.norm1.eps == block.norm2.eps == 1e-5
    x = torch.randn(2, 5, 16) * 1e-3  # small activations: eps matters
    torch.testing.assert_close(block.norm1(x), F.layer_norm(x, (16,), block.norm1.weight, block.norm1.bias, 1e-5))
    assert not torch.allclose(block.norm1(x), F.layer_norm(x, (16,), eps=1e-6), atol=1e-3)
    rms = Block(16, 2, norm_layer=nn.RMSNorm, norm_eps=1e-5)  # any norm that takes eps
    assert isinstance(rms.norm1, nn.RMSNorm) and rms.norm1.eps == 1e-5


def test_diff_attention_sub_norm_keeps_the_papers_eps():
    """The per-head RMSNorm is the Differential Transformer's (eps 1e-5, as timm's DiffAttention), not the
    block's LayerNorm, so it does not follow norm_eps."""
    assert DiffAttention(16, num_heads=2).sub_norm.eps == 1e-5
