"""Per-image token budgets of the content quadtree (`model.split_threshold`): each image gets the leaves its
detail needs, and the batch runs without padding as groups of equal counts."""
from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.layers.tokenizer import TokenGroups

ARGS = dict(img_size=64, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=10,
            tokenizer="quadtree", tokens=100, quadtree_sizes=(16, 4))


def _model(**options):
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", **{**ARGS, **options}).eval()


def _canvases() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.zeros(6, 1, 64, 64)
    x[1, :, 8:24, 8:24] = 1.0  # one square
    x[2, :, 8:24, 8:24] = x[2, :, 40:56, 8:24] = x[2, :, 24:40, 40:56] = 1.0  # three squares
    x[3:] = torch.rand(3, 1, 64, 64) * (torch.rand(3, 1, 64, 64) > 0.8)  # clutter everywhere
    return x


@pytest.mark.parametrize("threshold", [0.0, 1e-9])
def test_a_blank_image_keeps_its_roots_at_any_threshold(threshold):
    assert _model(split_threshold=threshold).tokenize(torch.zeros(2, 1, 64, 64)).counts.tolist() == [16, 16]


def test_a_blank_image_gets_the_roots_and_busier_images_more_up_to_the_cap():
    counts = _model(split_threshold=12.0).tokenize(_canvases()).counts.tolist()  # edge sum of a cell
    assert counts[0] == 16  # the 4 x 4 roots of 16 px: nothing to split
    assert 16 < counts[1] < counts[2] < 100  # one square < three squares
    assert counts[3:] == [100, 100, 100]  # clutter spends the cap


def test_grouped_batches_equal_each_image_alone_and_the_blocks_run_once_per_count():
    model = _model(split_threshold=2.0, head="segment", global_pool="avg")
    x = _canvases()
    calls = []
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    with torch.no_grad():
        batch = model(x)
        groups = len(set(model.tokenize(x).counts.tolist()))
        assert len(calls) == groups  # one dense batch per distinct count, not per image
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert batch.shape == (6, 10, 64, 64)
    assert torch.allclose(batch, alone, atol=1e-5)


def test_counts_are_rounded_to_the_budget_step_and_the_loss_trains_per_image():
    model = _model(split_threshold=2.0, budget_step=3).train()
    x = _canvases()
    t = model.tokenize(x)
    assert isinstance(t, TokenGroups)
    assert all((c - 16) % 9 == 0 or c == 100 for c in t.counts.tolist())  # 3 splits of 3 new leaves each
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(6))
    loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("leaf_pos", ["seq", "coords", "grid"])
def test_every_leaf_placement_takes_per_image_counts(leaf_pos):
    model = _model(split_threshold=16.0, leaf_pos=leaf_pos)
    x = _canvases()
    with torch.no_grad():
        assert torch.allclose(model(x), torch.cat([model(x[i:i + 1]) for i in range(len(x))]), atol=1e-5)


def test_threshold_zero_on_busy_images_is_the_fixed_budget():
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(_model(split_threshold=0.0)(x), _model()(x), atol=1e-6)


@pytest.mark.parametrize("options,message", [
    (dict(tokenizer="patch", tokens=None, quadtree_sizes=None, split_threshold=1.0), "model.tokenizer=quadtree"),
    (dict(split_threshold=-1.0), "split_threshold must be a score >= 0"),
    (dict(split_threshold=1.0, budget_step=0), "budget_step must be at least 1"),
])
def test_bad_budget_settings_are_one_line(options, message):
    with pytest.raises(VitlabError, match=message):
        _model(**options)


def test_features_of_images_with_different_counts_are_refused_in_one_line():
    with pytest.raises(VitlabError, match="different token counts"):
        _model(split_threshold=2.0).forward_features(_canvases())


def test_flops_of_per_image_budgets_are_counted_at_the_cap():
    from vitlab.stats import forward_gflops
    assert forward_gflops(_model(split_threshold=2.0)) == forward_gflops(_model())
