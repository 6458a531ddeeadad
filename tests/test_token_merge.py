"""Token merging (layers/token_merge.py) against the published algorithm, written here as a plain per-image
loop over the paper's steps (ToMe, arXiv 2210.09461, sec. 3 and appendix): the batched code must agree with it
in float64, merged sizes and sources included."""
from __future__ import annotations

import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.layers.token_merge import TokenMerging, merge_schedule


def reference_merge(x, size, metric, r, protected):
    """One image: x (N, C), size (N,), metric (N, d) -> merged x, sizes, and slot of each input token."""
    N = len(x)
    A, B = list(range(0, N, 2)), list(range(1, N, 2))
    m = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for a in A:
        if a < protected:
            continue
        sims = [(float(m[a] @ m[b]), b) for b in B if b >= protected]
        best[a] = max(sims)  # (similarity, b)
    merged = sorted(best, key=lambda a: -best[a][0])[:r]
    kept = [a for a in A if a not in merged]
    groups = {b: [b] for b in B}
    for a in merged:
        groups[best[a][1]].append(a)
    rows, sizes, slot = [], [], [0] * N
    for i, a in enumerate(kept):
        rows.append(x[a]), sizes.append(size[a])
        slot[a] = i
    for j, b in enumerate(B):
        s = sum(size[t] for t in groups[b])
        rows.append(sum(size[t] * x[t] for t in groups[b]) / s), sizes.append(s)
        for t in groups[b]:
            slot[t] = len(kept) + j
    return torch.stack(rows), torch.stack(sizes), torch.tensor(slot)


@pytest.mark.parametrize("N,protected,rs", [(17, 1, [4, 3, 2]), (16, 0, [8, 0, 3]), (9, 1, [1, 1, 1]),
                                            (30, 1, [7, 5, 1])])
def test_merging_equals_the_published_algorithm_over_several_layers(N, protected, rs):
    torch.manual_seed(0)
    B, C = 3, 6
    x = torch.randn(B, N, C, dtype=torch.float64)
    tm = TokenMerging(rs, N, protected)
    ref_x, ref_size, ref_where = list(x), [torch.ones(N, dtype=torch.float64)] * B, [torch.arange(N)] * B
    for r in rs:
        metric = torch.randn(B, x.shape[1], 4, dtype=torch.float64)
        tm.observe(metric[:, None].expand(-1, 2, -1, -1))  # two heads with the same keys: their mean is metric
        x = tm.merge(x)
        for i in range(B):
            if r == 0:  # ToMe leaves a block without merges alone (no reordering either)
                continue
            ref_x[i], ref_size[i], slot = reference_merge(ref_x[i], ref_size[i], metric[i], r, protected)
            ref_where[i] = slot[ref_where[i]]
        assert torch.allclose(x, torch.stack(ref_x), atol=1e-12)
        assert torch.equal(tm.size[..., 0], torch.stack(ref_size))
        if tm.source is not None:
            assert torch.equal(tm.source, torch.stack(ref_where))
    assert x.shape[1] == N - sum(rs)
    # the class token stays first and alone; sizes still count every original token
    assert torch.equal(tm.source[:, :protected], torch.zeros(B, protected, dtype=torch.long))
    assert torch.all(tm.size[:, :protected] == 1)
    assert torch.all(tm.size.sum(dim=(1, 2)) == N)


def test_unmerge_repeats_each_group_and_its_mean_is_the_size_weighted_mean():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    tm = TokenMerging([5], 12, 0)
    tm.observe(torch.randn(2, 1, 12, 3, dtype=torch.float64))
    y = tm.merge(x)
    full = tm.unmerge(y)
    assert full.shape == x.shape
    weighted = (y * tm.size).sum(1) / tm.size.sum(1)
    assert torch.allclose(full.mean(1), weighted, atol=1e-12)
    # the group mean is what each of its members receives
    for b in range(2):
        for slot in range(y.shape[1]):
            members = (tm.source[b] == slot).nonzero()[:, 0]
            assert torch.allclose(x[b, members].mean(0), y[b, slot], atol=1e-12)


def test_proportional_attention_bias_is_log_size():
    tm = TokenMerging([2], 6, 0)
    assert tm.attn_bias(torch.float32) is None  # before any merge every size is 1
    tm.observe(torch.randn(1, 1, 6, 4))
    tm.merge(torch.randn(1, 6, 3))
    bias = tm.attn_bias(torch.float32)
    assert bias.shape == (1, 1, 1, 4) and torch.allclose(bias.exp()[0, 0, 0], tm.size[0, :, 0])
    assert TokenMerging([2], 6, 0, proportional=False).attn_bias(torch.float32) is None


def test_merging_is_differentiable_in_the_tokens():
    x = torch.randn(2, 9, 4, requires_grad=True)
    tm = TokenMerging([3], 9, 1)
    tm.observe(torch.randn(2, 1, 9, 4))
    tm.merge(x).sum().backward()
    # each token reaches the output through its group's mean: with weight 1 / (the group's size)
    assert torch.allclose(x.grad, (1 / tm.unmerge(tm.size)).expand_as(x))


@pytest.mark.parametrize("merge,depth,expected", [(None, 3, [0, 0, 0]), (4, 3, [4, 4, 4]), ([5, 2], 4, [5, 2, 0, 0])])
def test_schedule(merge, depth, expected):
    assert merge_schedule(merge, depth) == expected


@pytest.mark.parametrize("merge", [-1, [1, 2, 3, 4], [1, -2], 1.5, True])
def test_schedule_refuses_what_is_not_a_token_count(merge):
    with pytest.raises(VitlabError, match="model.merge"):
        merge_schedule(merge, 3)


# -- in the models ------------------------------------------------------------------------------------------
import vitlab  # noqa: E402

SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5)
FAMILIES = [  # (model name, options): every family on the plain block stack
    ("vit_tiny_patch16_224", {}),
    ("vit_tiny_patch16_224", {"attn_layer": "diff"}),
    ("vit_tiny_patch16_224", {"attn_layer": "diff2"}),
    ("vit_tiny_patch16_224", {"attn_layer": "lsa", "tokenizer": "spt"}),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}),
    ("vit_tiny_patch16_224", {"head": "segment", "global_pool": "avg"}),
    ("vit_tiny_patch16_224", {"tokenizer": "quadtree", "tokens": 40}),
]


def _model(name, **options):
    torch.manual_seed(0)
    return vitlab.create_model(name, **{**SMALL, **options})


def _mlp_token_counts(model, x):
    counts = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: counts.append(i[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, counts


@pytest.mark.parametrize("name,options", FAMILIES)
def test_merging_shrinks_the_blocks_and_keeps_the_output_layout(name, options):
    x = torch.randn(2, 3, 32, 32)
    plain, counts0 = _mlp_token_counts(_model(name, **options).eval(), x)
    merged, counts = _mlp_token_counts(_model(name, merge=6, **options).eval(), x)
    assert merged.shape == plain.shape
    assert counts == [counts0[0] - 6 * (i + 1) for i in range(4)]  # r fewer tokens after every attention
    assert torch.isfinite(merged).all() and not torch.allclose(merged, plain)


def test_staged_models_merge_within_each_stage():
    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(0)
    model = vitlab.create_model("pit_vit_patch7_28", merge=2).eval()
    _, counts = _mlp_token_counts(model, x)
    # 17 tokens; 5 after the first pooling transition (merging restarts: at most half the patch tokens a
    # block); 2 after the second, where a class token and one patch token leave nothing to merge
    assert counts == [15, 13, 3, 2, 2, 2]


def test_no_merges_is_the_plain_model_and_merging_trains():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_model("vit_tiny_patch16_224").eval()(x),
                           _model("vit_tiny_patch16_224", merge=[0, 0]).eval()(x))
    model = _model("vit_tiny_patch16_224", merge=[8, 4, 4, 2], merge_prop_attn=False).train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks."))


@pytest.mark.parametrize("name", ["rev_vit_tiny_patch16_224", "momentum_vit_tiny_patch16_224",
                                  "resvit_tiny_patch16_224"])
def test_families_with_their_own_update_rule_refuse_merging_in_one_line(name):
    with pytest.raises(VitlabError, match="drop model.merge"):
        vitlab.create_model(name, merge=4)
