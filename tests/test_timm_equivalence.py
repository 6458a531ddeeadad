"""Numerical equivalence with timm's VisionTransformer (the test oracle), and pretrained-weight loading."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.errors import VitlabError

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import _load_weights  # noqa: E402

ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
        "qkv_bias", "class_token", "global_pool", "init_values")


def timm_twin(model):
    return TimmViT(**{k: model.vitlab_args[k] for k in ARGS}).eval()


def assert_same_logits(ours, theirs, x):
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert (a - b).abs().max().item() < 1e-5, (a - b).abs().max().item()


@pytest.mark.parametrize("name,overrides", [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch32_224", {}),
    ("vit_base_patch16_224", {"depth": 2}),
    ("vit_large_patch14_224", {"depth": 1, "img_size": 112}),
    ("vit_micro_patch4_28", {"in_chans": 1, "num_classes": 10}),
    ("vit_tiny_patch4_32", {"depth": 3, "global_pool": "avg", "init_values": 0.1}),
])
def test_logits_match_timm_with_copied_state_dict(name, overrides):
    torch.manual_seed(0)
    ours = vitlab.create_model(name, **overrides)
    theirs = timm_twin(ours)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # keys identical: no renaming
    a = ours.vitlab_args
    assert_same_logits(ours, theirs, torch.randn(2, a["in_chans"], a["img_size"], a["img_size"]))


def test_timm_checkpoint_loads_at_other_resolution_like_timm(tmp_path):
    """Resampled position embedding: our load_pretrained == timm's own pretrained loading at 160 px."""
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224")
    file = tmp_path / "tiny.safetensors"
    save_file(src.state_dict(), str(file))
    ref = timm.create_model("vit_tiny_patch16_224", img_size=160, pretrained=True,
                            pretrained_cfg_overlay={"file": str(file)})
    ours = vitlab.create_model("vit_tiny_patch16_224", img_size=160)
    notes = vitlab.load_pretrained(ours, file)
    assert any("14x14 to a 10x10" in n for n in notes)
    assert_same_logits(ours, ref, torch.randn(2, 3, 160, 160))


def test_head_dropped_and_channels_adapted(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", depth=2)
    file = tmp_path / "w.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, file)  # DDP-style file
    ref = timm.create_model("vit_tiny_patch16_224", depth=2, in_chans=1, num_classes=10, pretrained=True,
                            pretrained_cfg_overlay={"file": str(file)})
    ours = vitlab.create_model("vit_tiny_patch16_224", depth=2, in_chans=1, num_classes=10)
    head = ours.head.weight.clone()
    notes = vitlab.load_pretrained(ours, file)
    assert torch.equal(ours.head.weight, head), "a mismatching head must keep its fresh init"
    assert any("head.weight dropped" in n for n in notes) and any("to 1 input channels" in n for n in notes)
    ref.head.load_state_dict(ours.head.state_dict())
    assert_same_logits(ours, ref, torch.randn(2, 1, 224, 224))


def jax_npz_from_timm(model, path):
    """Write `model`'s weights in the original google-research ViT .npz layout."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D = model.embed_dim
    H = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0), "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        q, k, v = np.split(sd[o + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[o + "attn.qkv.bias"], 3)
        for n, wt, bs in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = wt.T.reshape(D, H, D // H)
            w[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = bs.reshape(H, D // H)
        w[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = sd[o + "attn.proj.weight"].T.reshape(H, D // H, D)
        w[f"{b}MultiHeadDotProductAttention_1/out/bias"] = sd[o + "attn.proj.bias"]
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            w[f"{b}{theirs}/scale"], w[f"{b}{theirs}/bias"] = sd[o + ours + ".weight"], sd[o + ours + ".bias"]
        for r in (1, 2):
            w[f"{b}MlpBlock_3/Dense_{r - 1}/kernel"] = sd[o + f"mlp.fc{r}.weight"].T
            w[f"{b}MlpBlock_3/Dense_{r - 1}/bias"] = sd[o + f"mlp.fc{r}.bias"]
    np.savez(path, **w)


def test_original_jax_npz_loads_like_timm(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch16_224", depth=2, num_classes=7).eval()
    file = tmp_path / "ViT-S_16.npz"
    jax_npz_from_timm(src, file)
    ref = timm.create_model("vit_small_patch16_224", depth=2, num_classes=7)
    _load_weights(ref, str(file))  # timm's own reader: validates the file layout
    x = torch.randn(2, 3, 224, 224)
    assert_same_logits(ref, src, x)
    ours = vitlab.create_model("vit_small_patch16_224", depth=2, num_classes=7)
    assert vitlab.load_pretrained(ours, file) == []
    assert_same_logits(ours, src, x)


def test_load_pretrained_errors(tmp_path):
    m = vitlab.create_model("vit_micro_patch2_8")
    with pytest.raises(VitlabError, match="not found"):
        vitlab.load_pretrained(m, tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_text("x")
    with pytest.raises(VitlabError, match="unsupported checkpoint format"):
        vitlab.load_pretrained(m, tmp_path / "w.ckpt")
    big = vitlab.create_model("vit_micro_patch2_8", depth=7)  # a deeper checkpoint: its first blocks load
    save_file(big.state_dict(), str(tmp_path / "big.safetensors"))
    assert vitlab.load_pretrained(m, tmp_path / "big.safetensors") == ["blocks 6-6 dropped (the model has 6)"]
    other = vitlab.create_model("diff_vit_micro_patch2_8")  # another family's extra parameters do not fit
    save_file(other.state_dict(), str(tmp_path / "diff.safetensors"))
    with pytest.raises(VitlabError, match="does not fit.*unexpected"):
        vitlab.load_pretrained(vitlab.create_model("vit_micro_patch2_8", num_heads=2), tmp_path / "diff.safetensors")
