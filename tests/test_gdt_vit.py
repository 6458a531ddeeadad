"""GDT-ViT's defining properties (ROUTED_AND_ADAPTIVE.md A.5), on tiny widths with random weights."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import VitlabError
from vitlab.layers.learned_quadtree import plan_tokens
from vitlab.layers.quadtree import LeafGroup, QuadtreeTokenizer, patchify, resize_leaves, split_children
from vitlab.layers.segment_head import paint
from vitlab.registry import model_args

TINY = dict(embed_dim=32, depth=2, num_heads=2, stage_depth=1, num_classes=5)


def gdt(img_size=32, stages=((16, 8, 0.25), (8, 4, 0.5)), patch_size=4, in_chans=3, seed=0, **kw):
    torch.manual_seed(seed)
    return vitlab.create_model("gdt_vit_tiny_64", img_size=img_size, stages=stages, patch_size=patch_size,
                               in_chans=in_chans, **{**TINY, **kw}).eval()


def images(batch=3, size=32, channels=3, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def leaf_crops_match(x, tree):
    for g in tree.groups:
        for b in range(len(x)):
            for pixels, (cx, cy) in zip(g.pixels[b], g.coords[b].long().tolist()):
                crop = x[b, :, cy:cy + g.size, cx:cx + g.size].reshape(-1)
                if not torch.allclose(pixels, crop, atol=1e-6):
                    return False
    return True


# (stages, M per stage, group sizes, T) of the original's four configs (256 px), A.2.9
CONFIGS = [
    ([(32, 16, .25), (16, 8, .25), (8, 4, .25), (4, 2, .25)], [64] * 4, [48, 48, 48, 48, 64], 256),
    ([(32, 16, .5), (16, 8, .25), (8, 4, .125), (4, 2, .0625)], [64, 128, 128, 64], [32, 96, 112, 60, 16], 316),
    ([(16, 8, .25), (8, 4, .25), (4, 2, .25)], [256] * 3, [192, 192, 192, 256], 832),
    ([(32, 16, .25), (16, 8, .25)], [64, 64], [48, 48, 64], 160),
]


@pytest.mark.parametrize("stages, seq_lens, groups, total", CONFIGS)
def test_token_count_formula(stages, seq_lens, groups, total):
    counts, got = plan_tokens(256, stages)
    assert got == groups and sum(got) == total and counts[:len(stages)] == seq_lens
    model = gdt(img_size=256, stages=stages, patch_size=16, embed_dim=16, depth=1, max_seq_len=seq_lens)
    with torch.no_grad():
        assert model.embed(images(1, 256)).shape == (1, 1 + total, 16)
    assert model.token_plan.endswith(f"T = {total}")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leaves_tile_the_image_exactly_and_hold_its_pixels(batch, seed):
    model = gdt(seed=seed).train()  # with Gumbel noise: the leaves pass through the straight-through multiply
    x = images(batch, seed=seed)
    tree = model.grow(x)
    boxes = tree.boxes.long()  # (B, T, 3)
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    x0, y0, s = (boxes[..., i, None, None] for i in range(3))
    coverage = ((xs >= x0) & (xs < x0 + s) & (ys >= y0) & (ys < y0 + s)).sum(1)  # (B, H, W)
    assert coverage.min() == 1 and coverage.max() == 1
    assert leaf_crops_match(x, tree)


def test_zero_splits_equal_uniform_patching_and_the_plain_vit():
    model = gdt(stages=[(8, 4, 0.0)], patch_size=8)
    x = images()
    with torch.no_grad():
        tokens = model.embed(x)[:, 1:] - model.pos_embed[:, 1:]
        proj = model.patch_embed.proj
        conv = F.conv2d(x, proj.weight, proj.bias, stride=8).flatten(2).transpose(1, 2)  # raster order
        torch.testing.assert_close(tokens, conv, atol=1e-5, rtol=1e-5)
        torch.manual_seed(0)
        plain = vitlab.create_model("vit_micro_patch2_8", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                    num_heads=2, num_classes=5).eval()
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all(k.startswith("patch_embed.stages.") for k in unexpected)
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)


def test_full_split_equals_the_finest_uniform_grid_up_to_a_permutation():
    model = gdt(stages=[(16, 8, 1.0), (8, 4, 1.0)], patch_size=4)
    x = images()
    with torch.no_grad():
        t = model.tokenize(x)
        tree, tokens = t.tree, t.tokens
        proj = model.patch_embed.proj
        grid = F.conv2d(x, proj.weight, proj.bias, stride=4).flatten(2).transpose(1, 2)  # (B, 64, D) raster
    boxes = tree.boxes
    assert (boxes[..., 2] == 4).all()
    raster = (boxes[..., 1] // 4 * 8 + boxes[..., 0] // 4).long()  # each token's place in the raster grid
    assert all(sorted(r.tolist()) == list(range(64)) for r in raster)
    torch.testing.assert_close(tokens, grid.gather(1, raster[..., None].expand_as(grid)), atol=1e-5, rtol=1e-5)


def test_children_geometry_and_order_match_unfold():
    pixels, coords = patchify(images(2, 16), 8)  # (2, 4, 3*64)
    children, child_coords = split_children(pixels, coords, 8, 4, 3)
    assert torch.equal(child_coords[0, :4], torch.tensor([[0., 0.], [4., 0.], [0., 4.], [4., 4.]]))
    patch = pixels[:, :1].reshape(2, 3, 8, 8)
    unfold = F.unfold(patch, 4, stride=4).transpose(1, 2)  # (2, 4, 3*16)
    assert torch.equal(children[:, :4], unfold)


def test_straight_through_gate_is_one_forward_and_leaves_do_not_depend_on_logits():
    model = gdt().train()
    x = images()
    torch.manual_seed(3)
    tree = model.grow(x)
    for gate, selected in zip(tree.gates, tree.selections):
        torch.testing.assert_close(gate.gather(1, selected), torch.ones_like(selected, dtype=gate.dtype),
                                   atol=1e-6, rtol=0)
    model.eval()
    before = model.grow(x)
    with torch.no_grad():  # logits x 3: the same top-k, other softmax weights behind the gates
        for stage in model.tokenizer.stages:
            stage.selector.weight.mul_(3.0)
            stage.selector.bias.mul_(3.0)
    after = model.grow(x)
    assert all(torch.equal(a, b) for a, b in zip(before.selections, after.selections))
    for a, b in zip(before.groups, after.groups):
        torch.testing.assert_close(a.pixels, b.pixels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scorer", ["slot", "token"])
def test_selector_gradient_is_alive_and_absent_without_splits(scorer):
    model = gdt(scorer=scorer).train()
    F.cross_entropy(model(images()), torch.arange(3)).backward()
    assert all(s.selector.weight.grad is not None and s.selector.weight.grad.abs().sum() > 0 for s in model.tokenizer.stages)
    still = gdt(stages=[(8, 4, 0.0)], patch_size=8).train()
    F.cross_entropy(still(images()), torch.arange(3)).backward()
    assert still.tokenizer.stages[0].selector.weight.grad is None


def test_eval_is_deterministic_sorted_and_noise_free():
    model = gdt()
    x = images()
    with torch.no_grad():
        a, tree = model.forward_with_tree(x)
        assert torch.equal(a, model(x))
        pixels, coords = patchify(x, 16)
        logits = model.tokenizer.stages[0].logits(pixels, coords)
    expected = logits.topk(model.tokenizer.stages[0].k, dim=1).indices.sort(dim=1).values
    assert torch.equal(tree.selections[0], expected)
    for selected in tree.selections:
        assert (selected[:, 1:] > selected[:, :-1]).all()
    model.tokenizer.eval_gumbel = True  # the original's noisy inference, on request
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_batch_independence():
    model = gdt(leaf_pos="coords")
    x = images(4)
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-5)


def test_bad_plans_fail_at_construction_with_one_line():
    with pytest.raises(VitlabError, match="max_seq_len"):
        gdt(max_seq_len=[64, 16])  # stage 0 receives 4 patches of 16 px at 32 px
    with pytest.raises(VitlabError, match="previous patch_out"):
        gdt(stages=[(16, 8, 0.5), (4, 2, 0.5)])
    with pytest.raises(VitlabError, match="multiple of the first stage"):
        gdt(img_size=40)
    with pytest.raises(VitlabError, match="multiple of 4"):
        gdt(embed_dim=30, num_heads=3)


def test_no_large_buffers_in_the_default_model():
    with torch.device("meta"):
        model = vitlab.create_model("gdt_vit_base_256")
    assert sum(b.numel() for b in model.buffers()) < 1e6
    assert not any("relative_index" in k for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(161.0e6, rel=0.01)  # A.2.10 less 4.7M bias


def test_bilinear_resize_is_the_identity_at_the_same_size():
    x = images(2, 8)
    assert torch.equal(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False), x)
    pixels, coords = patchify(x, 4)
    assert torch.equal(resize_leaves(LeafGroup(pixels, 4, coords), 4, 3), pixels)


def test_painting_inverts_leaf_extraction_for_leaf_constant_masks():
    model = gdt()
    tree = model.grow(images())
    labels = torch.randint(1, 10, tree.boxes.shape[:2]).float()  # one value per leaf
    mask = paint(labels[:, :, None, None, None].expand(-1, -1, 1, 4, 4), tree.boxes, model.tokenizer.sizes, 32)[:, 0]
    assert (mask > 0).all()  # every pixel painted
    for b in range(3):
        for (x, y, s), value in zip(tree.boxes[b].long().tolist(), labels[b]):
            assert (mask[b, y:y + s, x:x + s] == value).all()


# -- the content quadtree tokenizer (model.tokenizer=quadtree) ------------------------------------------------
def test_content_quadtree_of_a_flat_image_at_the_grid_budget_is_the_uniform_grid():
    torch.manual_seed(0)
    model = vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", tokens=64, quadtree_sizes=(16, 4),
                                in_chans=3, num_classes=5).eval()
    x = torch.full((2, 3, 32, 32), 0.3)
    leaves, boxes = model.tokenizer(x)
    assert (boxes[..., 2] == 4).all()
    assert torch.equal(boxes[0, :, :2], patchify(x, 4)[1][0])  # raster order
    pixels, _ = patchify(x, 4)
    assert torch.equal(leaves, pixels)


def test_content_quadtree_with_seq_positions_at_the_grid_budget_is_the_plain_vit():
    """leaf_pos=seq places leaves by a learned row per slot: at the full budget the leaves are the finest grid
    in raster order, so the plain ViT's weights give its logits exactly."""
    torch.manual_seed(0)
    plain = vitlab.create_model("vit_micro_patch4_32", in_chans=3, num_classes=5).eval()
    tree = vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", tokens=64, quadtree_sizes=(16, 4),
                               leaf_pos="seq", in_chans=3, num_classes=5).eval()
    assert tree.size_embed is None and tree.pos_embed.shape == plain.pos_embed.shape
    tree.load_state_dict(plain.state_dict())
    x = images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(tree(x), plain(x))
    with pytest.raises(VitlabError, match="leaf_pos"):
        vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", leaf_pos="corner")


def test_grid_positions_are_the_plain_vits_at_the_grid_budget_and_box_means_elsewhere():
    """leaf_pos=grid: a learned row per cell of the finest leaves, averaged over each leaf's box. At the full
    budget every leaf is a finest cell, so (size embedding zeroed) the plain ViT's weights give its logits
    exactly, whatever the image; a 16 px leaf gets the mean of the 16 rows its box covers."""
    torch.manual_seed(0)
    plain = vitlab.create_model("vit_micro_patch4_32", in_chans=3, num_classes=5).eval()
    tree = vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", tokens=64, quadtree_sizes=(16, 4),
                               leaf_pos="grid", in_chans=3, num_classes=5).eval()
    assert tree.pos_embed.shape == plain.pos_embed.shape
    missing, unexpected = tree.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["size_embed.weight"] and not unexpected
    torch.nn.init.zeros_(tree.size_embed.weight)
    x = images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(tree(x), plain(x))
        grid = tree.pos_embed[:, 1:]
        coords = torch.tensor([[[16.0, 0.0], [8.0, 24.0], [28.0, 4.0]]])  # a 16, an 8 and a 4 px leaf
        got = tree.leaf_positions.pooled(grid, coords, torch.tensor([[0, 1, 2]]))[0]
        rows = grid[0].reshape(8, 8, -1)  # (row, column) of 4 px cells
        want = [rows[0:4, 4:8].mean((0, 1)), rows[6:8, 2:4].mean((0, 1)), rows[1, 7]]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("score", ["edge", "variance"])
def test_content_quadtree_spends_its_budget_on_the_content(score):
    x = torch.zeros(3, 1, 64, 64)
    for b, (r, c) in enumerate([(4, 8), (30, 30), (40, 2)]):
        x[b, :, r:r + 20, c:c + 20] = torch.rand(20, 20, generator=torch.Generator().manual_seed(b))
    x[0, :, 48:, 48:] = 0.7  # a flat root cell: no edges or variance inside, so it stays one leaf
    tokenizer = QuadtreeTokenizer(64, 4, 1, 16, 52, 16, 4, score)
    leaves, boxes = tokenizer(x)
    assert leaves.shape == (3, 52, 16) and boxes.shape == (3, 52, 3)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    b = boxes.long()
    x0, y0, s = (b[..., i, None, None] for i in range(3))
    inside = (xs >= x0) & (xs < x0 + s) & (ys >= y0) & (ys < y0 + s)  # (B, L, H, W)
    assert (inside.sum(1) == 1).all()  # the leaves tile every image
    # every split cell held content (or its 1-px border, where differences are non-zero): the parent of each
    # finest leaf touches the square
    near = F.max_pool2d((x > 0).float(), 3, stride=1, padding=1)[:, 0] > 0
    px, py = (b[..., 0] // 8 * 8)[..., None, None], (b[..., 1] // 8 * 8)[..., None, None]
    parent = (xs >= px) & (xs < px + 8) & (ys >= py) & (ys < py + 8)
    small = boxes[..., 2] == 4
    assert small.any(1).all() and (small <= (parent & near[:, None]).flatten(2).any(-1)).all()
    # image 0's flat bottom-right root stays a leaf: its pixels resized to the patch
    corner = (boxes[0] == torch.tensor([48.0, 48.0, 16.0])).all(-1)
    assert corner.sum() == 1
    resized = F.interpolate(x[:1, :, 48:, 48:], size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(leaves[0, corner.nonzero()[0, 0]], resized.reshape(-1))
    assert torch.allclose(resized, torch.tensor(0.7))


def test_quadtree_tokenizer_rejects_bad_budgets():
    """(Every family trains with the quadtree tokenizer, each parameter getting a gradient: test_contracts.py.)"""
    with pytest.raises(VitlabError, match="3 leaves"):
        vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", tokens=24, quadtree_sizes=(16, 4))
    with pytest.raises(VitlabError, match="transition=linear"):
        vitlab.create_model("staged_vit_patch4_32", tokenizer="quadtree", transition="pool")
    with pytest.raises(VitlabError, match="patch_embed=conv and model.tokenizer=quadtree"):
        vitlab.create_model("vit_micro_patch4_32", tokenizer="quadtree", patch_embed="conv")


def test_random_tree_has_the_same_shape_and_no_scorer():
    model = gdt(scorer="random")
    assert not any(n.startswith("patch_embed.stages.") for n, _ in model.named_parameters())
    x = images()
    with torch.no_grad():
        a, b = model.grow(x), model.grow(x)  # uniform draws, also at inference (a baseline, not a model)
    assert [g.pixels.shape for g in a.groups] == [g.pixels.shape for g in gdt().grow(x).groups]
    assert not all(torch.equal(p, q) for p, q in zip(a.selections, b.selections))
    assert leaf_crops_match(x, a)


@pytest.mark.parametrize("kw", [dict(name="gdt_vit_tiny_64", leaf_pos="coords"),
                                dict(name="gdt_vit_tiny_64", head="segment"),
                                dict(name="vit_micro_patch4_32", img_size=64, tokenizer="quadtree", tokens=52,
                                     quadtree_sizes=(16, 4), task="segment")])  # the old spelling of head
def test_run_logs_can_count_flops_of_quadtree_models(kw):
    """The trainer counts a forward pass on the meta device: every quadtree path must run there."""
    from vitlab.stats import forward_gflops
    kw = dict(kw)
    model = vitlab.create_model(kw.pop("name"), in_chans=1, **kw)
    assert forward_gflops(model) > 0


def test_without_qkv_bias_as_the_original_classifier():
    """The original's attention has qkv = Linear(D, 3D, bias=False); its preset says so, and building one
    initialises (the learned tree's init used to zero-fill the missing bias)."""
    model = gdt(qkv_bias=False)
    assert all(b.attn.qkv.bias is None for b in model.blocks)
    assert model_args("gdt_vit_base_256")["qkv_bias"] is False
    assert model(images()).shape == (3, 5)


def test_torch_stage_encoder_is_the_originals_post_norm_relu_layer():
    """stage_encoder=torch: each level scores with torch's TransformerEncoderLayer (post-norm, ReLU, dropout
    0.1), as the original; the tree still tiles the image and the scorer still gets a gradient."""
    model = gdt(stage_encoder="torch").train()
    stage = model.tokenizer.stages[0]
    layer = stage.blocks[0]
    assert isinstance(layer, torch.nn.TransformerEncoderLayer) and not layer.norm_first
    assert layer.activation is F.relu or getattr(layer, "activation_relu_or_gelu", 0) == 1
    assert stage.norm.eps == 1e-5 and stage.input_drop.p == 0.1
    x = images()
    logits, tree = model.forward_with_tree(x)
    logits.sum().backward()
    assert leaf_crops_match(x, tree)
    assert stage.selector.weight.grad.abs().sum() > 0


def canvas(batch=3, size=64, seed=0):
    """Blank canvases (many tied, zero-edge cells) with a few bright rectangles of different sizes each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((batch, 1, size, size), -0.5)
    for b in range(batch):
        for _ in range(4):
            y0, x0 = torch.randint(0, size - 12, (2,), generator=g).tolist()
            h, w = torch.randint(3, 12, (2,), generator=g).tolist()
            x[b, :, y0:y0 + h, x0:x0 + w] = torch.rand(1, generator=g).item() + 0.5
    return x


def one_stage(scorer, seed=0, stages=((16, 8, 0.75),), **kw):
    """The content quadtree min8's shape as a learned tree: 16 roots of 16 px, 12 split into 8 px, leaves at 8 px."""
    return gdt(img_size=64, stages=stages, patch_size=8, in_chans=1, scorer=scorer, seed=seed, **kw)


@pytest.mark.parametrize("scorer", ["heuristic", "prior"])
def test_prior_without_correction_or_noise_is_the_content_quadtree(scorer):
    """The heuristic (and the prior scorer at its start: correction zero) picks the content quadtree's cells; with
    raster leaf order its tokens are the content quadtree's leaves and boxes, in its order."""
    from vitlab.layers.learned_quadtree import box_scores, edge_map
    x = canvas()
    content = QuadtreeTokenizer(64, 8, 1, 8, tokens=52, root=16, min_size=8)
    patches, coords = patchify(x, 16)
    torch.testing.assert_close(box_scores(edge_map(x), coords, 16), content.cell_scores(x)[:, :16])
    leaves, boxes = content(x)
    model = one_stage(scorer, leaf_order="raster", noise_scale=0.0).train()  # train: no noise at scale 0
    tree = model.grow(x)
    split = boxes[..., 2] == 8  # the content tree's 8 px leaves' parents are its split roots
    parents = ((boxes[..., 1] // 16) * 4 + boxes[..., 0] // 16).long()
    for b in range(len(x)):
        assert set(parents[b][split[b]].tolist()) == set(tree.selections[0][b].tolist())
    torch.testing.assert_close(tree.boxes, boxes)
    mine = torch.cat([resize_leaves(g, 8, 1) for g in tree.groups], dim=1)
    torch.testing.assert_close(mine, leaves)
    assert leaf_crops_match(x, tree)


def test_prior_scorers_gradient_reaches_its_correction_and_scale():
    model = one_stage("prior", prior_scale=2.0).train()
    stage = model.tokenizer.stages[0]
    assert stage.selector.weight.abs().sum() == 0 and stage.prior_scale.item() == 2.0  # starts at the heuristic
    F.cross_entropy(model(canvas()), torch.arange(3)).backward()
    assert stage.selector.weight.grad.abs().sum() > 0 and stage.prior_scale.grad.abs() > 0
    assert not any(n.startswith("patch_embed.stages.") for n, _ in one_stage("heuristic").named_parameters())


def test_noise_scale_and_leaf_order_options():
    x = canvas()
    model = one_stage("prior")
    with torch.no_grad():
        model.tokenizer.stages[0].selector.bias.fill_(1.0)  # a nonzero correction
        quiet = model.train().tokenizer
        quiet.noise_scale = 0.0
        a, b = model.grow(x), model.grow(x)
        assert torch.equal(a.selections[0], b.selections[0])
        quiet.noise_scale = 1.0
        assert any(not torch.equal(model.grow(x).selections[0], a.selections[0]) for _ in range(5))
    for g in one_stage("token", leaf_order="raster").grow(x).groups:
        key = g.coords[..., 1] * 64 + g.coords[..., 0]
        assert (key[:, 1:] > key[:, :-1]).all()
    with pytest.raises(VitlabError, match="scorer"):
        one_stage("edges")


def test_detail_estimator_leaves_the_forward_and_gives_flat_patches_no_gradient():
    """estimator=detail: the gate scales only what splitting adds over the unsplit leaf's view, so the leaves are
    the image's crops and a flat image gives the scorer no gradient; one with detail does."""
    x = canvas()
    model = one_stage("token", estimator="detail").train()
    tree = model.grow(x)
    assert leaf_crops_match(x, tree)
    model(x).sum().backward()
    assert model.tokenizer.stages[0].selector.weight.grad.abs().sum() > 0
    flat = one_stage("token", estimator="detail").train()
    flat(torch.zeros_like(x)).sum().backward()
    assert flat.tokenizer.stages[0].selector.weight.grad.abs().sum() == 0


def test_prior_context_breaks_flat_ties_towards_the_content():
    """prior_context: flat roots next to the content split before flat roots away from it (raster order
    otherwise), and a root with content still splits before any flat one."""
    x = torch.full((1, 1, 64, 64), -0.5)
    x[0, 0, 50:60, 50:60] = 1.0  # content in root 15 (bottom right) only
    plain = one_stage("heuristic", stages=[(16, 8, 0.25)]).grow(x).selections[0][0].tolist()
    near = one_stage("heuristic", stages=[(16, 8, 0.25)], prior_context=0.01).grow(x).selections[0][0].tolist()
    assert plain == [0, 1, 2, 15] and near == [10, 11, 14, 15]


def test_a_learned_tree_starts_from_a_trained_classifier(tmp_path):
    """model.pretrained from a heuristic tree's weights (no learned tree in them): every classifier weight
    loads, the tree's own parameters keep their fresh start, so the prior scorer starts at the heuristic; a
    checkpoint that misses a classifier weight is still refused."""
    from safetensors.torch import save_file
    from vitlab.pretrained import load_pretrained
    trained = one_stage("heuristic", seed=1)
    save_file(trained.state_dict(), tmp_path / "heuristic.safetensors")
    learned = one_stage("prior", seed=2)
    load_pretrained(learned, tmp_path / "heuristic.safetensors")
    ours = learned.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in trained.state_dict().items())
    assert learned.tokenizer.stages[0].selector.weight.abs().sum() == 0
    x = canvas()
    learned.eval(), trained.eval()
    torch.testing.assert_close(learned(x), trained(x))  # the correction is zero: the same tree, the same logits
    partial = {k: v for k, v in trained.state_dict().items() if not k.startswith("blocks.0.")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(VitlabError, match="does not fit"):
        load_pretrained(one_stage("prior"), tmp_path / "partial.safetensors")
