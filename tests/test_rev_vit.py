"""Reversible and momentum ViTs: gradients equal plain autograd (dropout and drop-path replayed); memory flat
in depth."""
import pytest
import torch

import vitlab
from vitlab.stats import saved_for_backward


def grads(model, x, memory_efficient: bool):
    model.memory_efficient = memory_efficient
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout / drop-path draws for both runs
    model(x).square().mean().backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["rev_vit", "momentum_vit"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_memory_saving_backward_equals_plain_autograd(family, dtype, tol):
    torch.manual_seed(0)
    model = vitlab.create_model(f"{family}_micro_patch7_28", in_chans=1, num_classes=10, depth=6, drop_rate=0.1,
                                attn_drop_rate=0.1, drop_path_rate=0.2, init_values=0.5).to(dtype).train()
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    gx_rev, gp_rev = grads(model, x, True)
    gx_ref, gp_ref = grads(model, x, False)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rel(gx_rev, gx_ref) <= tol
    for name, g in gp_ref.items():
        assert gp_rev[name] is not None, name
        assert rel(gp_rev[name], g) <= tol, name


def test_forward_leaves_global_random_stream_to_one_draw():
    """Branches run on their own seeded streams: a pass advances the global stream by one draw only."""
    model = vitlab.create_model("rev_vit_micro_patch2_8", depth=3, drop_path_rate=0.5).train()
    torch.manual_seed(3)
    model(torch.randn(2, 3, 8, 8))
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.randn(2, 3, 8, 8)
    torch.randint(2 ** 62, (1,))
    assert torch.equal(torch.rand(1), after)


def saved_bytes(model, x) -> int:
    """Bytes the forward pass leaves for backward; the backward runs outside the count, since its per-block
    recomputation is transient."""
    saved, loss = saved_for_backward(lambda: model(x).sum())
    loss.backward()
    return saved


@pytest.mark.parametrize("family", ["rev_vit", "momentum_vit"])
def test_activation_memory_is_flat_in_depth(family):
    x = torch.randn(8, 3, 8, 8)
    kw = dict(img_size=8, patch_size=2, embed_dim=32, num_heads=2, num_classes=10)
    ours = [saved_bytes(vitlab.create_model(f"{family}_micro_patch2_8", depth=d, **kw), x) for d in (6, 48)]
    vit = [saved_bytes(vitlab.create_model("vit_micro_patch2_8", depth=d, **kw), x) for d in (6, 48)]
    assert ours[1] <= 1.25 * ours[0]
    assert vit[1] >= 6 * vit[0]  # a standard ViT keeps every block's activations
    assert ours[1] < vit[1] / 10


def test_momentum_vit_has_the_reference_state_dict_and_checks_beta():
    ref = vitlab.create_model("vit_micro_patch7_28", depth=2)
    mom = vitlab.create_model("momentum_vit_micro_patch7_28", depth=2, beta=0.5)
    mom.load_state_dict(ref.state_dict())  # same keys and shapes: weights move both ways
    with pytest.raises(vitlab.errors.VitlabError, match="beta must be in"):
        vitlab.create_model("momentum_vit_micro_patch7_28", beta=1.0)
