"""Res-ViT's defining properties (ROUTED_AND_ADAPTIVE.md B.6): tiny dims, D=64, L=6, 4 heads, 32 px, patch 8."""
import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
import vitlab.stats  # noqa: F401  (FLOP formulas for CPU attention)
from vitlab.layers.lora import apply_lora
from vitlab.models.res_vit import cosine_target, pattern_id, run_end, run_start
from vitlab.objective import as_output

ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=10,
            router_hdim=32, low_rank_dim=8)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pair(**res_args):
    """A plain ViT and a Res-ViT holding its weights (seeded alike: identical reference weights)."""
    base = {k: v for k, v in ARGS.items() if k not in ("router_hdim", "low_rank_dim")}
    torch.manual_seed(0)
    plain = vitlab.create_model("vit_base_patch16_224", **base).eval()
    torch.manual_seed(0)
    res = vitlab.create_model("resvit_base_patch16_224", **{**ARGS, **res_args}).eval()
    missing, unexpected = res.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("routers.", "approximators.")) for k in missing)
    return plain, res


def force(res, keep: bool):
    """Every router decides keep (or skip) for every token, whatever its input."""
    with torch.no_grad():
        for r in res.routers:
            r.mlp[-1].weight.zero_()
            r.mlp[-1].bias.view(-1, 2).copy_(torch.tensor([0.0, 50.0 if keep else -50.0]))


@pytest.mark.parametrize("execution", ["mask", "skip", "mod"])
@pytest.mark.parametrize("lora", [False, True])
def test_all_active_equals_the_plain_vit(execution, lora):
    plain, res = pair(execution=execution, capacity=1.0)
    force(res, keep=True)
    if lora:
        apply_lora(res, rank=4)  # B = 0: no change yet
    with torch.no_grad():
        expected, got = plain(X), res(X)
    if execution == "mask":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", ["mask", "skip"])
def test_all_skipped_with_zero_approximators_is_the_truncated_vit(execution):
    plain, res = pair(execution=execution, reserve_initials=0, dynamic_start_layer=2, eval_routing="threshold")
    force(res, keep=False)
    with torch.no_grad():
        for a in res.approximators:
            a.up.zero_()
        x = plain.embed(X)
        for block in plain.blocks[:2]:
            x = block(x)
        expected = plain.forward_head(plain.norm(x))
        if execution == "mask":
            assert torch.equal(res(X), expected)
        else:
            torch.testing.assert_close(res(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("decisions", [("sample", "threshold"), ("topk", "topk")])
def test_train_and_eval_agree_with_deterministic_routing(block_size, decisions):
    """Without noise, training's decisions are inference's: p > 1/2 (the original) or each image's top-k."""
    train_routing, eval_routing = decisions
    _, res = pair(gumbel_noise=False, router_keep_bias=0.0, block_size=block_size, dynamic_start_layer=2,
                  train_routing=train_routing, eval_routing=eval_routing, active_target=0.5)
    with torch.no_grad():
        res.train()
        train_logits = as_output(res(X)).logits
        res.eval()
        for execution in ("mask", "skip"):
            res.execution = execution
            torch.testing.assert_close(res(X), train_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 2, 4])
def test_mask_algebra_from_bits(b):
    """Each pattern runs layer j iff bit j is set; the approximator fires exactly at the last layer of every
    inactive run, keyed by the run's first layer (approx_key=run) or by the pattern (pid)."""
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=b)))  # (2^b, b)
    pid = pattern_id(patterns)
    assert pid.tolist() == list(range(2 ** b))
    for j in range(b):
        ends = run_end(patterns, j)
        starts = run_start(patterns, j)
        for bits, end, start in zip(patterns.tolist(), ends.tolist(), starts.tolist()):
            last_of_run = bits[j] == 0 and (j == b - 1 or bits[j + 1] == 1)
            assert end == float(last_of_run), (bits, j)
            if bits[j] == 0:
                first = j
                while first > 0 and bits[first - 1] == 0:
                    first -= 1
                assert start == first, (bits, j)


def test_run_keys_index_distinct_approximators():
    _, res = pair(block_size=2, dynamic_start_layer=2, approx_key="run")
    assert res.approximators[0].down.shape[0] == 3  # runs (0,0), (0,1), (1,1)
    keys = {(i, j): int(res.run_index[i, j]) for i in range(2) for j in range(i, 2)}
    assert sorted(keys.values()) == [0, 1, 2]


def test_reserved_tokens_always_run():
    _, res = pair(reserve_initials=3, eval_routing="threshold")
    force(res, keep=False)
    _, keep = res.route(X)  # (B, dynamic layers, N)
    assert keep[:, :, :3].all() and not keep[:, :, 3:].any()


def test_cosine_target_schedule():
    T, rho = 1000, 0.4
    assert cosine_target(0, T, rho) == pytest.approx(1.0)
    assert cosine_target(T, T, rho) == pytest.approx(rho)
    assert cosine_target(T // 2, T, rho) == pytest.approx((1 + rho) / 2)
    assert cosine_target(5 * T, T, rho) == pytest.approx(rho)
    values = [cosine_target(t, T, rho) for t in range(0, T + 1, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ratio_loss_is_zero_at_the_target_and_pushes_toward_it():
    _, res = pair(lambda_active=1.0, distill="none", gumbel_noise=False)
    res.train()
    with torch.no_grad():  # mean keep probability = sigmoid(0) = 0.5 exactly
        for r in res.routers:
            r.mlp[-1].weight.zero_()
            r.mlp[-1].bias.zero_()
    res.active_target = res.target = 0.5
    assert as_output(res(X)).losses["active"].item() == pytest.approx(0.0, abs=1e-12)
    for target, sign in ((0.3, 1.0), (0.8, -1.0)):  # gradient on the keep bias has the sign of (p - target)
        res.target = target
        res.zero_grad()
        as_output(res(X)).losses["active"].backward()
        keep_bias_grad = res.routers[0].mlp[-1].bias.grad.view(-1, 2)[:, 1]
        assert (keep_bias_grad * sign > 0).all()


@pytest.mark.parametrize("router_grad", ["ste", "none"])
def test_router_gradient_from_the_task_loss(router_grad):
    _, res = pair(router_grad=router_grad, router_keep_bias=0.0, distill="none")
    res.train()
    torch.manual_seed(1)
    out = as_output(res(X))
    torch.nn.functional.cross_entropy(out.logits, torch.arange(4)).backward()  # the task loss alone
    # The last dynamic layer's decisions for patch tokens cannot change the class token's logits (the class
    # token always runs), so the task gradient reaches every router but that one.
    grads = [p.grad for name, p in res.routers[:-1].named_parameters() if "norm" not in name]
    if router_grad == "ste":
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(p.grad is None for p in res.routers.parameters())


@pytest.mark.parametrize("eval_routing", ["threshold", "topk"])
def test_skip_equals_mask_under_the_same_routing(eval_routing):
    _, res = pair(router_keep_bias=0.0, eval_routing=eval_routing)
    with torch.no_grad():
        for r in res.routers:
            r.mlp[-1].weight.normal_(std=1.0)  # mixed decisions per token
        res.execution = "mask"
        logits_mask, keep_mask = res.route(X)
        res.execution = "skip"
        logits_skip, keep_skip = res.route(X)
    assert torch.equal(keep_mask, keep_skip)
    assert 0.2 < keep_mask[:, :, 1:].float().mean() < 0.8
    torch.testing.assert_close(logits_skip, logits_mask, rtol=1e-5, atol=1e-5)


def _flops(model, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    return counter.get_total_flops()


def test_skip_flops_are_affine_in_the_active_ratio_and_match_the_formula():
    """Per dynamic layer in `skip`: (2 + 10a) N D^2 + 2a N^2 D multiply-adds plus 2 r D N for the approximator
    (ROUTED_AND_ADAPTIVE.md B.3.4); everything else does not depend on a."""
    _, res = pair(routing="random", execution="skip")
    N, D = 17, 64
    x = X[:1]

    def measured(target):
        res.target = target
        torch.manual_seed(3)
        flops = _flops(res, x)
        torch.manual_seed(3)
        _, keep = res.route(x)
        return flops, keep[0].float().mean(-1)  # per-layer active fraction

    base_flops, _ = measured(0.0)  # only the cls token runs the dynamic layers
    for target in (0.3, 0.6, 1.0):
        flops, a = measured(target)
        a0 = torch.full_like(a, 1 / N)
        predicted = sum(2 * ((10 * (ai - bi)) * N * D * D + 2 * (ai - bi) * N * N * D)
                        for ai, bi in zip(a.tolist(), a0.tolist()))
        assert (flops - base_flops) == pytest.approx(predicted, rel=0.01)


def test_timm_state_dict_leaves_exactly_the_new_keys_missing():
    torch.manual_seed(0)
    plain = vitlab.create_model("vit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=6,
                                num_heads=4, num_classes=10)
    sd = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}  # a random timm-format checkpoint
    res = vitlab.create_model("resvit_base_patch16_224", **ARGS, capacity=1.0)
    apply_lora(res, rank=4)
    missing, unexpected = res.load_state_dict(sd, strict=False)
    new = {k for k in res.state_dict() if k.startswith(("routers.", "approximators.")) or ".lora_" in k}
    assert set(missing) == new and not unexpected
    plain.load_state_dict(sd)
    force(res, keep=True)
    with torch.no_grad():
        torch.testing.assert_close(res.eval()(X), plain.eval()(X), rtol=1e-5, atol=1e-5)


def test_distillation_and_entropy_terms_are_reported():
    _, res = pair(distill="layer_local", router_keep_bias=0.0, lambda_entropy=0.1)
    res.train()
    out = as_output(res(X))
    assert set(out.losses) == {"active", "distill", "entropy"}
    assert set(out.metrics) == {"active_dynamic", "active_all", "target", "router_entropy"}
    assert 0 < out.metrics["active_dynamic"] < 1 and out.metrics["active_all"] > out.metrics["active_dynamic"]
    assert math.isfinite(out.losses["distill"].item())


def test_bad_plans_are_one_line_errors():
    with pytest.raises(vitlab.VitlabError, match="multiple of model.block_size"):
        vitlab.create_model("resvit_base_patch16_224", **{**ARGS, "block_size": 4, "dynamic_start_layer": 1})


def test_router_entropy_is_finite_for_saturated_routers():
    _, res = pair(lambda_entropy=0.1)
    force(res, keep=True)  # keep probability 1 - 2e-22: log(1 - p) underflows in float32
    res.train()
    out = as_output(res(X))
    assert torch.isfinite(out.losses["entropy"]) and out.metrics["router_entropy"] < 1e-6
    out.losses["entropy"].backward()
    assert all(torch.isfinite(p.grad).all() for p in res.routers.parameters() if p.grad is not None)


def test_topk_eval_routing_runs_at_the_target_ratio():
    """A router at p_keep = 0.62 everywhere meets a 0.6 target in training; at inference `threshold` keeps every
    token, `topk` keeps 60% of the patch tokens in every layer."""
    _, res = pair(active_target=0.6)
    with torch.no_grad():
        for r in res.routers:
            r.mlp[-1].weight.normal_(std=0.01)
            r.mlp[-1].bias.view(-1, 2).copy_(torch.tensor([0.0, 0.5]))
    _, keep = res.route(X)
    assert keep[:, :, 1:].float().mean() == pytest.approx(math.ceil(0.6 * 16) / 16)
    res.eval_routing = "threshold"
    _, keep = res.route(X)
    assert keep.all()


def test_topk_training_keeps_each_images_budget():
    """train_routing=topk: every image keeps exactly the current target's share of its patch tokens in every
    dynamic layer (the budget top-k inference applies), the draws differ under Gumbel noise."""
    _, res = pair(active_target=0.5, router_keep_bias=0.0, distill="none")
    res.train()
    _, trace = res._run(X)
    bits = torch.stack(trace.bits, 1)[:, :, 1:]  # (B, dynamic layers, patch tokens)
    assert torch.equal(bits.sum(-1), torch.full(bits.shape[:2], 8.0))  # 0.5 of 16 in every image and layer
    _, again = res._run(X)
    assert not torch.equal(torch.stack(again.bits, 1)[:, :, 1:], bits)


@pytest.mark.parametrize("execution", ["skip", "mod"])
def test_routed_inference_is_one_graph(execution):
    """Top-k inference has static shapes (each image keeps `capacity` tokens), so Dynamo captures all of it:
    what torch.compile needs to fuse the gathers, norms and bias-GELUs around the smaller matmuls."""
    _, res = pair(active_target=0.5, execution=execution)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(res)(X)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_skip_equals_eager():
    """Inductor's kernels for the routed path (index_select / index_copy_ of the kept rows, keys and values
    over every token) compute what eager does."""
    _, res = pair(active_target=0.5, router_keep_bias=0.0)
    with torch.no_grad():
        for r in res.routers:
            r.mlp[-1].weight.normal_(std=1.0)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(res, dynamic=False)(X), res(X), rtol=1e-4, atol=1e-4)
