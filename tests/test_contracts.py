"""Contracts every model keeps, parametrized over the registry (timm's tests/test_models.py idea): a family
registered later is tested here for free. One representative per family for the heavier contracts; the
forward/backward contract runs over every registered name."""
import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from conftest import ROOT, model_input, tiny_model
from vitlab.objective import as_output
from vitlab.registry import list_models, model_entry
from vitlab.train.checkpoint import model_metadata
from vitlab.train.evaluate import load_checkpoint


def representatives() -> list[str]:
    """One name per registered family: the one with the fewest tokens at its default size."""
    best: dict[str, tuple] = {}
    for name in list_models():
        a = vitlab.registry.model_args(name)
        key = ((a["img_size"] // a["patch_size"]) ** 2, name)
        family = model_entry(name).family
        best[family] = min(best.get(family, key), key)
    return sorted(name for _, name in best.values())


FAMILIES = representatives()


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = tiny_model(name).train()
    out = as_output(model(model_input(model)))
    assert out.logits.shape == (3, 5) and torch.isfinite(out.logits).all()
    (out.logits.square().mean() + sum(out.losses.values())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_is_deterministic_and_per_sample(name):
    """Eval output is a function of the sample alone: the same twice, and independent of its batch."""
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    x = model_input(model, batch=4)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_rebuilt_from_checkpoint_metadata_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    config = vitlab.load_config(None, [f"model.name={name}"]).dump()
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file,
              metadata=model_metadata(model, config))
    rebuilt, cfg, _ = load_checkpoint(file)
    assert type(rebuilt) is type(model) and rebuilt.vitlab_args == model.vitlab_args
    x = model_input(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert json.loads(json.dumps(model.vitlab_args)) == model.vitlab_args  # metadata is plain JSON


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a = tiny_model(name).eval()
    torch.manual_seed(1)
    b = tiny_model(name).eval()
    x = model_input(a)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_interface_and_intermediates(name):
    """forward = forward_head(forward_features); forward_intermediates lists the blocks' outputs."""
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    x = model_input(model, batch=2)
    depth = len(model.blocks)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        final, outs = model.forward_intermediates(x)
        assert len(outs) == depth and all(t.shape[0] == 2 and t.ndim == 3 for t in outs)
        torch.testing.assert_close(final, feats)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], outs[-1])
        assert model.forward_intermediates(x, indices=[0], intermediates_only=True)[0].shape == outs[0].shape
    assert isinstance(model.architecture, str) and model.architecture


@pytest.mark.parametrize("name", [n for n in FAMILIES
                                  if not {"widths", "stages"} & set(vitlab.registry.model_args(n))])
def test_same_seed_starts_from_the_reference_weights(name):
    """Every family that keeps the reference's block widths builds and initialises once, in the reference's
    order: at one seed, each parameter it shares with the reference ViT (same name and shape) has the same
    values (a wider head, BDIA's quantiser or momentum change nothing else). Staged ViTs interleave
    transitions between their blocks, and quadtree ViTs draw a position table of another length first, so
    they are not expected to."""
    torch.manual_seed(0)
    model = tiny_model(name)
    args = {k: v for k, v in model.vitlab_args.items() if k in vitlab.registry.model_args("vit_micro_patch2_8")}
    torch.manual_seed(0)
    ref = vitlab.create_model("vit_micro_patch2_8", **args)
    ours, theirs = model.state_dict(), ref.state_dict()
    shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
    assert len(shared) >= len(theirs) // 2
    assert [k for k in shared if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_compile_equals_eager(name):
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    x = model_input(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def _private_imports(path: Path) -> list[str]:
    """'module: name' for every private name `path` imports from another vitlab module."""
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__" and (node.level or
                                                                             (node.module or "").startswith("vitlab")):
            bad += [f"{node.module}: {a.name}" for a in node.names if a.name.startswith("_")]
    return bad


def test_no_module_imports_another_modules_private_names():
    offenders = {str(p.relative_to(ROOT)): _private_imports(p) for p in (ROOT / "src" / "vitlab").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_model_files_are_free_of_devices_and_parallelism():
    """torchtitan's rule: model code never picks a device, launches processes or wraps itself."""
    for path in (ROOT / "src" / "vitlab" / "models").rglob("*.py"):
        text = path.read_text()
        for word in ("torch.distributed", ".cuda(", "DistributedDataParallel", "torch.compile", "device=\"cuda"):
            assert word not in text, f"{path.name} mentions {word}"
