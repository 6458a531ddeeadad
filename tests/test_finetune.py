"""Fine-tuning: LoRA on any model (merge, init, freezing, the adapter file), seed 001's checkpoint layout,
steps-based training with OneCycle, seed 001's command lines, MNIST-on-canvas."""
import json

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from conftest import MNIST_DIR, QUICK, run_cli, tiny_model
from vitlab.layers.lora import (TRAIN_WITH_LORA, apply_lora, freeze_for_lora, merge_lora, merged_state_dict,
                                unmerge_lora)
from vitlab.objective import as_output
from vitlab.pretrained import load_pretrained

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def small(name="vit_base_patch16_224", **kw):
    torch.manual_seed(0)
    return vitlab.create_model(name, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                               **kw).eval()


def test_lora_starts_at_the_base_model_and_merges_exactly():
    base = small()
    model = small()
    apply_lora(model, rank=4, targets=["qkv", "proj", "fc1", "fc2"])
    with torch.no_grad():
        assert torch.equal(model(X), base(X))  # B = 0
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
        adapted = model(X)
        assert not torch.allclose(adapted, base(X))
        merge_lora(model)
        torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
        plain = small()
        plain.load_state_dict(merged_state_dict(model))  # the export loads into the model without LoRA
        torch.testing.assert_close(plain(X), adapted, rtol=1e-5, atol=1e-5)


def test_qkv_gets_three_independent_adapters_and_seed001_init_is_nonzero():
    model = small()
    apply_lora(model, rank=4, alpha=8, init="normal001")
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_A.shape == (3, 4, 32) and qkv.lora_B.shape == (3, 32, 4) and qkv.scale == 2.0
    assert qkv.lora_B.abs().sum() > 0 and 0.005 < qkv.lora_A.std() < 0.02
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # timm keys unchanged


def test_frozen_parameters_are_bitwise_unchanged_after_a_step_and_the_trainable_set_is_seed001s():
    model = vitlab.create_model("resvit_base_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3,
                                num_heads=4, num_classes=5, dynamic_start_layer=1, router_hdim=16, low_rank_dim=4,
                                router_keep_bias=0.0)
    apply_lora(model, rank=4)
    freeze_for_lora(model, TRAIN_WITH_LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if (".lora_" in n or n.startswith(("routers.", "approximators.", "head.")) or n == "cls_token")
                and ".norm." not in n}
    assert trainable == expected and all(".norm" not in n for n in trainable)
    assert any(n.startswith("routers.") and "norm" in n for n, p in model.named_parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = as_output(model(X))
    (torch.nn.functional.cross_entropy(out.logits, torch.arange(2)) + sum(out.losses.values())).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["vit_micro_patch2_8", "diff_vit_micro_patch2_8", "rev_vit_micro_patch2_8"])
def test_lora_applies_to_other_families(name):
    model = tiny_model(name).eval()
    x = torch.randn(2, 1, 4, 4) if model.vitlab_args["in_chans"] == 1 else torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = model(x)
        assert apply_lora(model, rank=2)
        assert torch.equal(model(x), before)


def _seed001_layout(model):
    """`model`'s weights written the way seed 001's JAX-converted .pth holds them."""
    sd, D, H = model.state_dict(), model.embed_dim, model.num_heads
    out = {"embedding.weight": sd["patch_embed.proj.weight"], "embedding.bias": sd["patch_embed.proj.bias"],
           "cls_token": sd["cls_token"], "transformer.pos_embedding.pos_embedding": sd["pos_embed"],
           "transformer.norm.weight": sd["norm.weight"], "transformer.norm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, t = f"blocks.{i}.", f"transformer.encoder_layers.{i}."
        for n, w, bias in zip(("query", "key", "value"), sd[b + "attn.qkv.weight"].chunk(3),
                              sd[b + "attn.qkv.bias"].chunk(3)):
            out[f"{t}attn.{n}.weight"] = w.T.reshape(D, H, D // H)  # (D, H, d)
            out[f"{t}attn.{n}.bias"] = bias.reshape(H, D // H)
        out[t + "attn.out.weight"] = sd[b + "attn.proj.weight"].T.reshape(H, D // H, D)  # (H, d, D)
        out[t + "attn.out.bias"] = sd[b + "attn.proj.bias"]
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{t}{part}.{p}"] = sd[f"{b}{part}.{p}"]
    return out


def test_seed001_checkpoint_layout_loads_and_equals_the_timm_layout(tmp_path):
    source = small()
    torch.save({"state_dict": _seed001_layout(source)}, tmp_path / "ViT-B_16.pth")
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    a, b = small(), small()
    torch.manual_seed(1)
    for p in a.parameters():  # make sure the load really replaces every weight
        p.data.normal_()
    load_pretrained(a, tmp_path / "ViT-B_16.pth")
    load_pretrained(b, tmp_path / "timm.pth")
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    res = small("resvit_base_patch16_224", dynamic_start_layer=1, router_hdim=16, low_rank_dim=4)
    # routers and approximators may be missing (and are named as kept at their init), nothing else
    assert load_pretrained(res, tmp_path / "ViT-B_16.pth") == [
        "approximators.*, routers.* not in the checkpoint: kept their initialisation"]


def test_a_shallower_model_takes_the_first_blocks(tmp_path):
    source = small()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(0)
    cut = vitlab.create_model("vit_base_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4,
                              num_classes=5)
    notes = load_pretrained(cut, tmp_path / "w.pth")
    assert notes == ["blocks 1-1 dropped (the model has 1)"]
    assert torch.equal(cut.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_max_steps_with_onecycle_and_a_lora_run_writes_adapter_and_merged_weights(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(["train", *QUICK, f"output.dir={out}", "output.savefile=base", "train.epochs=2"], capsys)
    base = out / "vitlab" / "base" / "checkpoints" / "best" / "model.safetensors"
    assert code == 0 and base.is_file()
    code, _, err = run_cli(["train", *QUICK, f"output.dir={out}", "output.savefile=ft", f"model.pretrained={base}",
                            "lora.rank=4", "lora.targets=[qkv,fc1]", "train.max_steps=7", "optim.name=sgd",
                            "optim.schedule=onecycle", "optim.warmup_steps=2", "optim.lr=0.05"], capsys)
    assert code == 0, err
    run = out / "vitlab" / "ft"
    log = (run / "train.log").read_text()
    assert "trainable" in log and "LoRA rank 4" in log
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 7
    results = json.loads((run / "results.json").read_text())
    assert results["trainable_params"] < results["params"] / 2
    adapter, merged = load_file(run / "adapter.safetensors"), load_file(run / "merged.safetensors")
    assert all(".lora_" in k or k.startswith("head.") or k == "cls_token" for k in adapter)
    assert not any(".lora_" in k for k in merged)
    from vitlab.train import load_checkpoint
    full, _, _ = load_checkpoint(run)
    plain, cfg, _ = load_checkpoint(run / "merged.safetensors")
    assert cfg.lora.rank == 0
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), full(x), rtol=1e-4, atol=1e-4)
    code, stdout, _ = run_cli(["evaluate", "--checkpoint-path", run / "adapter.safetensors"], capsys)
    assert code == 0 and json.loads(stdout)["top1"] == pytest.approx(json.loads(
        run_cli(["evaluate", "--checkpoint", run], capsys)[1])["top1"], abs=0.02)


def test_dataset_names_ignore_case_and_dashes():
    for spelling in ("CIFAR-100", "CIFAR100", "cifar_100", "Cifar100"):
        assert vitlab.load_config(None, [f"data.dataset={spelling}"]).data.dataset == "cifar100"


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_mnist_canvas_places_real_digits_at_redrawn_positions():
    from vitlab.data import build_data
    from vitlab.resolve import build
    cfg = build({"data": {"dataset": "mnist_canvas", "data_dir": str(MNIST_DIR), "canvas_size": 40,
                          "canvas_digit_size": 20, "augment": "none", "max_train_samples": 256}})
    data = build_data(cfg.data)
    assert len(data.splits["train"]) == 256 and data.img_size == 40
    train = data.loader("train", 256)
    train.set_epoch(1)
    x1, y1 = next(iter(train))
    train.set_epoch(2)
    x2, y2 = next(iter(train))
    assert x1.shape == (256, 1, 40, 40)
    background = x1.amin()
    assert ((x1 > background).flatten(1).float().mean(1) < 0.25).all()  # a 20 px digit on a 40 px canvas
    order1, order2 = y1.argsort(stable=True), y2.argsort(stable=True)
    assert not torch.equal(x1[order1], x2[order2])  # positions (and order) change with the epoch
    val = data.loader("val", 64)
    assert torch.equal(next(iter(val))[0], next(iter(val))[0])  # fixed for evaluation


def test_canvas_clutter_adds_fragments_of_other_digits_and_leaves_the_digit_and_its_mask_alone():
    """data.canvas_clutter: fragments pasted over the canvas (brightest pixel wins) drawn per (seed, epoch,
    sample), the same in a subset; the digit's layout, the label and the segmentation mask are the clean
    canvas's."""
    from vitlab.data.datasets import CanvasDigits, CanvasMasks
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(1, 256, (40, 1, 12, 12), generator=g, dtype=torch.uint8)  # no black pixel: ink is visible
    clean, busy = CanvasDigits(digits, 36, 12, seed=3), CanvasDigits(digits, 36, 12, seed=3, clutter=5)
    idx = torch.arange(40)
    assert busy.fragment == 4 and busy[idx].shape == (40, 1, 36, 36)
    assert torch.equal(busy.render(idx, clutter=False), clean[idx])  # the digit where it was without clutter
    assert (busy[idx] >= clean[idx]).all()
    lit = (busy[idx] > 0).flatten(1).sum(1) - (clean[idx] > 0).flatten(1).sum(1)
    assert (lit > 0).all() and (lit <= 5 * 16).all()  # at most five 4 px squares more, always some
    labels = torch.arange(40) % 10
    assert torch.equal(CanvasMasks(busy, labels)[idx], CanvasMasks(clean, labels)[idx])  # fragments are background
    first = busy[idx]
    busy.set_epoch(1)
    assert not torch.equal(busy[idx], first)  # redrawn each epoch
    busy.set_epoch(0)
    assert torch.equal(busy[idx], first)  # and a function of the epoch
    part = busy.subset(torch.tensor([3, 7]))
    assert torch.equal(part.fragments, busy.fragments[:, :, [3, 7]]) and len(part.pool) == 40  # same fragments
    last = busy.subset(torch.tensor([3, 39]))  # holding the largest id: the digits' layout is the set's too
    assert torch.equal(last[torch.tensor([0, 1])], busy[torch.tensor([3, 39])])
    with pytest.raises(vitlab.VitlabError, match="data.canvas_clutter=-1 must be in 0..64"):
        CanvasDigits(digits, 36, 12, seed=3, clutter=-1)


def test_lr_scale_gives_named_parameters_their_own_learning_rate():
    from vitlab.config import OptimConfig
    from vitlab.train.optim import build_optimizer
    model = small("resvit_base_patch16_224", dynamic_start_layer=1, router_hdim=16, low_rank_dim=4)
    cfg = vitlab.load_config(None, ["optim.lr_scale={routers.: 10}", "optim.lr=0.01"]).optim
    assert isinstance(cfg, OptimConfig) and cfg.lr_scale == {"routers.": 10.0}
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.1 if name.startswith("routers.") else 0.01), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(vitlab.VitlabError, match="optim.lr_scale"):
        vitlab.load_config(None, ["optim.lr_scale={routers.: fast}"])
