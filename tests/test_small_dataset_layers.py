"""Shifted Patch Tokenization and Locality Self-Attention (Lee et al., arXiv 2112.13492) against the paper's
formulas, and the reversible/BDIA project's names built with them (the one-pixel shifts themselves:
tests/test_fidelity.py; SPT and LSA as swaps of any family: the contract cases in tests/test_contracts.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import LocalitySelfAttention, ShiftedPatchEmbed


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


@pytest.mark.parametrize("name", ["vit_small", "vit_small_reverse", "vit_small_bdia", "vit_small_momentum"])
def test_small_dataset_names_are_the_originals_architecture(name):
    model = vitlab.create_model(name, depth=2, img_size=28, num_classes=7, in_chans=1).train()
    assert isinstance(model.patch_embed, ShiftedPatchEmbed) and model.patch_embed.shifts == "axis"
    assert all(isinstance(b.attn, LocalitySelfAttention) and b.attn.qkv.bias is None for b in model.blocks)
    assert model.blocks[0].norm1.eps == model.norm.eps == 1e-5  # torch's default, as the original
    assert len(model.blocks) == 2 and model.embed_dim == 512 and model.patch_embed.patch_size == 4
    assert model.blocks[0].mlp.fc1.out_features == 512  # MLP width 512 (ratio 1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    plain = vitlab.create_model(name, depth=2, tokenizer="patch", attn_layer="mhsa", qkv_bias=True)
    assert type(plain.patch_embed).__name__ == "PatchEmbed"  # the plain-layer versions stay available
