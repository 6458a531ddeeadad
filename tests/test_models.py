"""Registry behaviour, model statistics and the reference ViT's options (the contracts every model keeps are
in test_contracts.py)."""
import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.registry import model_args
from vitlab.stats import model_stats


def test_aliases_and_sizes_from_table():
    assert vitlab.create_model("b16", depth=1).vitlab_name == "vit_base_patch16_224"
    for alias, name in {"b32": "vit_base_patch32_224", "l16": "vit_large_patch16_224",
                        "l32": "vit_large_patch32_224", "h14": "vit_huge_patch14_224"}.items():
        assert model_args(alias) == model_args(name)
    assert {"b16", "h14"} <= set(vitlab.list_models(aliases=True))
    assert vitlab.list_models("vit_small_patch16*") == ["vit_small_patch16_224", "vit_small_patch16_384"]


@pytest.mark.parametrize("name,params_m,gflops", [("vit_tiny_patch16_224", 5.72, 1.26),
                                                  ("vit_small_patch16_224", 22.05, 4.6),
                                                  ("vit_base_patch16_224", 86.57, 17.56),
                                                  ("vit_large_patch16_224", 304.33, 61.6),
                                                  ("vit_huge_patch14_224", 632.05, 167.4)])
def test_params_and_gflops_match_published(name, params_m, gflops):
    s = model_stats(name)
    assert s["params"] / 1e6 == pytest.approx(params_m, abs=0.01)
    assert s["gflops"] == pytest.approx(gflops, rel=0.01)


def test_overrides_none_keeps_default_and_bad_inputs_fail_clearly():
    m = vitlab.create_model("vit_micro_patch2_8", depth=None, num_classes=3)
    assert m.vitlab_args["depth"] == 6 and m.vitlab_args["num_classes"] == 3
    with pytest.raises(VitlabError, match="unknown model 'vit_smal_patch16_224'.*did you mean 'vit_small_patch16_224'"):
        vitlab.create_model("vit_smal_patch16_224")
    with pytest.raises(VitlabError, match="no argument 'dept'.*did you mean 'depth'"):
        vitlab.create_model("vit_micro_patch2_8", dept=3)
    with pytest.raises(VitlabError, match="image size 30 is not divisible by patch size 16"):
        vitlab.create_model("vit_tiny_patch16_224", img_size=30)


def test_pooling_options_and_layerscale():
    x = torch.randn(2, 3, 32, 32)
    m = vitlab.create_model("vit_tiny_patch4_32", depth=1, global_pool="avg", class_token=False, init_values=1e-5)
    assert m(x).shape == (2, 1000)
    assert m.pos_embed.shape[1] == 64 and m.cls_token is None
    assert torch.allclose(m.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert vitlab.create_model("vit_tiny_patch4_32", depth=1, num_classes=0)(x).shape == (2, 192)


def test_patch_embed_matmul_equals_strided_conv():
    m = vitlab.create_model("vit_micro_patch4_28", in_chans=3)
    x = torch.randn(2, 3, 28, 28)
    conv = torch.nn.functional.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=4)
    torch.testing.assert_close(m.patch_embed(x), conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("img,patch,channels", [(28, 7, [16, 32, 64]), (32, 4, [32, 64]), (224, 16, [8, 16, 32, 64]),
                                                (8, 2, [64])])
def test_conv_stem_reaches_the_patch_grid(img, patch, channels):
    """patch_embed=conv: ceil-halving 3x3 stride-2 convs land on the same (img/patch)^2 tokens as the patchify, with
    channels doubling up to D; the whole model trains (every parameter gets a gradient)."""
    torch.manual_seed(0)
    model = vitlab.create_model("vit_micro_patch7_28", img_size=img, patch_size=patch, in_chans=1, num_classes=3,
                                depth=1, patch_embed="conv").train()
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == channels and all(c.stride == (2, 2) for c in convs)
    x = torch.randn(2, 1, img, img)
    assert model.patch_embed(x).shape == (2, (img // patch) ** 2, 64)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_conv_stem_rejects_an_unreachable_grid():
    with pytest.raises(VitlabError, match="conv stem halves 224 px to 14, not to the 16-token grid"):
        vitlab.create_model("vit_huge_patch14_224", patch_embed="conv", depth=1)
    with pytest.raises(VitlabError, match="unknown tokenizer 'convnext'"):
        vitlab.create_model("vit_micro_patch7_28", stem="convnext")  # the old spelling of the argument
