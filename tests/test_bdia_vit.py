"""BDIA-ViT: bit-exact reconstruction, gradients equal autograd through the same quantised forward, packed
side bits, eval equals the reference ViT up to quantisation, memory."""
import pytest
import torch

import vitlab
from vitlab.models.bdia_vit import draw_gammas, pack_bits, unpack_bits


def run(model, x, memory_efficient: bool):
    model.memory_efficient = memory_efficient
    model.trace = [] if memory_efficient else None
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(11)  # the same gamma and dropout draws for both runs
    out = model(x)
    out.square().mean().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reconstruction_is_bit_exact_and_gradients_match_autograd(seed, dtype, tol):
    torch.manual_seed(seed)
    depth = 12
    model = vitlab.create_model("bdia_vit_micro_patch7_28", in_chans=1, num_classes=10, depth=depth,
                                drop_rate=0.1, drop_path_rate=0.1).to(dtype).train()
    x = torch.randn(4, 1, 28, 28, dtype=dtype) * 3
    out, gx, gp = run(model, x, True)
    forward_states, rebuilt = model.trace[:depth], model.trace[depth:][::-1]  # (x_{k-1}, x_k), k = 0 .. L-1
    assert len(rebuilt) == depth
    assert all(torch.equal(a, b) for fa, rb in zip(forward_states, rebuilt) for a, b in zip(fa, rb))  # bit for bit
    ref_out, ref_gx, ref_gp = run(model, x, False)
    assert torch.equal(out, ref_out)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rel(gx, ref_gx) <= tol
    assert all(rel(gp[n], g) <= tol for n, g in ref_gp.items())


def test_gammas_take_both_signs_per_sample_and_block():
    g = draw_gammas(5, 12, torch.zeros(64, 3, 8))
    assert g.shape == (12, 64, 1, 1) and set(g.unique().tolist()) == {-0.5, 0.5}
    assert torch.equal(g, draw_gammas(5, 12, torch.zeros(64, 3, 8)))  # regenerated from the seed alone
    assert not draw_gammas(None, 12, torch.zeros(64, 3, 8)).any()  # eval: gamma = 0


def test_side_bits_are_packed_eight_per_byte():
    s = torch.randint(0, 2, (3, 17, 5)).float()
    packed = pack_bits(s)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-s.numel() // 8)
    assert torch.equal(unpack_bits(packed, s), s)


def test_eval_is_the_reference_vit_up_to_quantisation():
    torch.manual_seed(0)
    ref = vitlab.create_model("vit_micro_patch7_28", in_chans=1, num_classes=10).eval()
    x = torch.randn(8, 1, 28, 28)
    diffs = []
    with torch.no_grad():
        logits = ref(x)
        for bits in (9, 16):
            bdia = vitlab.create_model("bdia_vit_micro_patch7_28", in_chans=1, num_classes=10, bits=bits).eval()
            bdia.load_state_dict(ref.state_dict())  # same keys: weights move both ways
            diffs.append((bdia(x) - logits).abs().max().item())
    assert 0 < diffs[0] < 0.05 * logits.abs().max().item()  # a few % of the logits: not a different model
    # the gap is rounding noise of size 2^-bits: 7 more bits shrink it ~2^7 = 128-fold
    assert 2 ** 7 / 4 < diffs[0] / diffs[1] < 2 ** 7 * 4


def test_kept_state_is_two_activations_plus_one_bit_per_element():
    """Saved tensors stay flat in depth; the side information grows by 1/32 of an fp32 state per block."""
    from test_rev_vit import saved_bytes
    from vitlab.stats import saved_for_backward
    x = torch.randn(8, 3, 8, 8)
    kw = dict(img_size=8, patch_size=2, embed_dim=32, num_heads=2, num_classes=10)
    kept, sides = [], []
    for depth in (6, 48):
        model = vitlab.create_model("bdia_vit_micro_patch2_8", depth=depth, **kw).train()
        passes = []
        original = model.new_pass
        model.new_pass = lambda: passes.append(original()) or passes[-1]  # keep the pass to read its side bits
        saved, loss = saved_for_backward(lambda: model(x).sum())
        sides.append(sum(t.numel() for t in passes[0].side.values()))  # before the backward consumes them
        loss.backward()
        kept.append(saved)
    state = 8 * 17 * 32 * 4  # one fp32 state (B, N, D)
    assert kept[1] <= 1.25 * kept[0]
    assert sides == [5 * state // 32, 47 * state // 32]
    vit48 = saved_bytes(vitlab.create_model("vit_micro_patch2_8", depth=48, **kw), x)
    assert kept[1] + sides[1] < vit48 / 4


