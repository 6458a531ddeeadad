"""A model is tokenizer -> blocks -> head: every family on the standard token path takes every tokenizer and
either head by name, and trains a step with it; the parts keep their defining properties when composed."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import VitlabError
from vitlab.layers.tokenizer import TokenSet
from vitlab.registry import model_args

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
#: one registered name per block stack (each family's own update rule or stack)
FAMILIES = {"vit": "vit_micro_patch4_32", "diff_vit": "diff_vit_micro_patch4_32", "rev_vit": "rev_vit_micro_patch4_32",
            "bdia_vit": "bdia_vit_micro_patch4_32", "momentum_vit": "momentum_vit_micro_patch4_32",
            "resvit": "resvit_micro_patch4_32", "staged_vit": "staged_vit_patch4_32"}
QUADTREE = dict(tokenizer="quadtree", tokens=10, quadtree_sizes=(8, 4))  # 4 roots of 8 px + 2 splits


def build(family: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    size = dict(widths=(16, 32), depths=(1, 1), head_dim=16) if family == "staged_vit" else \
        dict(embed_dim=32, depth=2, num_heads=2)
    extra = dict(dynamic_start_layer=1, router_hdim=16, low_rank_dim=8) if family == "resvit" else {}
    base = {k: v for k, v in TINY.items() if k not in ("embed_dim", "depth", "num_heads")}
    return vitlab.create_model(FAMILIES[family], **{**base, **size, **extra, **kw})


def train_step(model: torch.nn.Module, head: str) -> torch.Tensor:
    """One optimizer step; returns the output of the forward pass."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 16, 16) if head == "segment" else (2,), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.train()(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    extra = sum(out.losses.values()) if not isinstance(out, torch.Tensor) else 0.0
    loss = F.cross_entropy(logits, target) + extra
    loss.backward()
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)
    return logits


@pytest.mark.parametrize("head", ["classify", "segment"])
@pytest.mark.parametrize("tokenizer", ["patch", "quadtree"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_takes_every_tokenizer_and_head_and_trains_a_step(family, tokenizer, head):
    model = build(family, head=head, **(QUADTREE if tokenizer == "quadtree" else {}))
    logits = train_step(model, head)
    assert logits.shape == ((2, 3, 16, 16) if head == "segment" else (2, 3))


@pytest.mark.parametrize("tokenizer", ["conv", "spt", "spt_paper"])
def test_grid_tokenizers_segment_too(tokenizer):
    model = build("rev_vit", tokenizer=tokenizer, head="segment")
    assert train_step(model, "segment").shape == (2, 3, 16, 16)


def test_gdt_vit_is_the_vit_with_the_learned_tokenizer_and_segments():
    torch.manual_seed(0)
    model = vitlab.create_model("gdt_vit_tiny_64", img_size=16, patch_size=4, stages=[[8, 4, 0.5]], stage_depth=1,
                                embed_dim=32, depth=2, num_heads=2, num_classes=3, head="segment")
    assert type(model.tokenizer).__name__ == "LearnedQuadtreeTokenizer" and model.tokenizer is model.patch_embed
    assert train_step(model, "segment").shape == (2, 3, 16, 16)
    with pytest.raises(VitlabError, match="no argument 'tokenizer'"):
        vitlab.create_model("gdt_vit_tiny_64", tokenizer="quadtree")  # the tree is GDT's own


def test_a_tokenizer_returns_tokens_with_their_boxes_and_the_blocks_never_ask_which():
    x = torch.randn(2, 3, 16, 16)
    for kw in ({}, QUADTREE, dict(tokenizer="conv")):
        model = build("vit", **kw).eval()
        tokens = model.tokenize(x)
        assert isinstance(tokens, TokenSet) and tokens.tokens.shape[:2] == tokens.boxes.shape[:2]
        area = (tokens.boxes[..., 2] ** 2).sum(1)
        assert torch.equal(area, torch.full((2,), 256.0))  # the boxes tile the image
        with torch.no_grad():  # forward = head(norm(blocks(embed(tokens)))), with the tokens' boxes
            z = model.norm(model.forward_blocks(model.embed_tokens(tokens)))
            torch.testing.assert_close(model.forward_head(z, tokens=tokens), model(x))
            assert model.forward_head(z, True).shape == (2, 32)  # timm's positional pre_logits


def test_segment_head_paints_each_patch_its_own_prediction():
    """On the patch grid, token i's P x P prediction lands exactly on patch i's pixels."""
    model = build("vit", head="segment").eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tokens = model.tokenize(x)
        z = model.norm(model.forward_blocks(model.embed_tokens(tokens)))
        per_token = model.head(model.fc_norm(z[:, 1:])).unflatten(-1, (3, 4, 4))  # (1, 16, K, 4, 4)
        mask = model(x)
    for i, (bx, by, _) in enumerate(tokens.boxes[0].long().tolist()):
        torch.testing.assert_close(mask[0, :, by:by + 4, bx:bx + 4], per_token[0, i])


def test_old_spellings_keep_working():
    """`patch_embed` / `stem` name the tokenizer, `task` the head; a saved run records its full arguments,
    old and new side by side, and rebuilds the model it trained (`patch_embed: spt` meant the paper's shifts)."""
    assert model_args("vit_micro_patch4_32", patch_embed="conv")["tokenizer"] == "conv"
    assert model_args("vit_micro_patch4_32", stem="conv")["tokenizer"] == "conv"
    assert model_args("vit_micro_patch4_32", task="segment")["head"] == "segment"
    assert model_args("vit_small", patch_embed="spt")["tokenizer"] == "spt_paper"  # what the old name meant
    saved = dict(patch_embed="spt", tokenizer="patch", task="classify")  # a vit_small run from before
    with pytest.raises(VitlabError, match="shifted-patch tokenizer's old layout"):  # refused, never garbage
        model_args("vit_small", **saved)
    saved = dict(patch_embed="patch", tokenizer="patch", task="classify")  # arguments added since: that time's
    assert model_args("gdt_vit_base_256", **saved)["stage_encoder"] == "vit"
    assert model_args("vit_small", **saved)["norm_eps"] == 1e-6
    saved = dict(patch_embed="patch", tokenizer="quadtree", tokens=52, task="segment")
    args = model_args("vit_micro_patch4_32", img_size=64, **saved)
    assert args["tokenizer"] == "quadtree" and args["head"] == "segment" and "patch_embed" not in args
    args = model_args("gdt_vit_tiny_64", tokenizer="patch", tokens=None, quadtree_score="edge", task="classify")
    assert "tokenizer" not in args  # what a GDT-ViT run recorded when the ViT's arguments were its own
    with pytest.raises(VitlabError, match="keep model.tokenizer alone"):
        model_args("vit_micro_patch4_32", tokenizer="quadtree", patch_embed="conv")


def test_gdt_checkpoints_from_before_the_tokenizer_owned_the_tree_still_load():
    model = vitlab.create_model("gdt_vit_tiny_64", stage_depth=1)
    old = {k.replace("patch_embed.stages.", "stages."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("stages.") for k in old)
    fresh = vitlab.create_model("gdt_vit_tiny_64", stage_depth=1)
    fresh.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_norm_eps_reaches_every_layer_norm_and_the_originals_presets_use_theirs():
    model = build("rev_vit", norm_eps=1e-5)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-5}
    assert {m.eps for m in build("vit").modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}  # timm's
    for name in ("vit_small", "vit_small_bdia", "gdt_vit_base_256"):
        assert model_args(name)["norm_eps"] == 1e-5


def test_parts_refuse_what_they_cannot_do_in_one_line(tmp_path, capsys):
    from conftest import QUICK, run_cli

    with pytest.raises(VitlabError, match="norm_eps must be positive"):
        build("vit", norm_eps=0.0)
    with pytest.raises(VitlabError, match="set model.tokenizer=quadtree or drop them"):
        build("vit", tokens=10)
    code, _, err = run_cli(["train", *QUICK, "model.head=segment", f"output.dir={tmp_path}"], capsys)
    assert code == 2 and "one class per image" in err and err.count("\n") == 1
    assert not any(tmp_path.rglob("*.yaml"))  # refused before the run directory is written
