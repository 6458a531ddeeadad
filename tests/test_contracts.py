"""Contracts every model keeps (timm's tests/test_models.py idea), parametrized over what a model *is*: each
model class (family), and each option that swaps one of its parts (attention, tokenizer, head, stage
transition), built tiny. Registered names are a class plus defaults and sizes, so they are not the axis: many
build the same model. The registry is covered by one cheap test that every name builds and that its class and
its choices are among the cases below, so a family or option added later fails there until it has a case."""
import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from conftest import ROOT, SIZE_ARGS, model_input, registered_name, tiny_model
from vitlab.models import VisionTransformer
from vitlab.models.bdia_vit import BDIAViT
from vitlab.models.gdt_vit import GDTViT
from vitlab.models.momentum_vit import MomentumViT
from vitlab.models.res_vit import ResViT
from vitlab.models.rev_vit import RevViT
from vitlab.models.staged_vit import StagedViT
from vitlab.objective import as_output
from vitlab.registry import builder_parameters, list_models, model_args, model_entry
from vitlab.train.checkpoint import model_metadata
from vitlab.train.evaluate import load_checkpoint

#: the families that run the standard token path (tokenizer -> blocks -> head), with the options that make
#: each one itself where its registered defaults could be another's
FAMILIES = [(VisionTransformer, {}), (RevViT, {}), (BDIAViT, {}), (MomentumViT, {}), (ResViT, {}),
            (StagedViT, {"transition": "linear"})]

#: (model class, options): one line per distinct model. Every class at its defaults, each swappable part once
#: on the reference ViT, and every family with the content quadtree's tokens painted by the segmentation head.
FAMILY_CASES = [*FAMILIES, (StagedViT, {"transition": "pool"}), (GDTViT, {})]
OPTION_CASES = [
    (VisionTransformer, {"attn_layer": "diff"}),
    (VisionTransformer, {"attn_layer": "diff2"}),
    (VisionTransformer, {"attn_layer": "lsa"}),
    (VisionTransformer, {"tokenizer": "conv"}),
    (VisionTransformer, {"tokenizer": "spt"}),
    (VisionTransformer, {"tokenizer": "spt_paper"}),
    (VisionTransformer, {"tokenizer": "quadtree"}),
    (VisionTransformer, {"head": "segment"}),
]
COMPOSED_CASES = [
    *[(cls, {**options, "tokenizer": "quadtree", "head": "segment"}) for cls, options in FAMILIES],
    (GDTViT, {"head": "segment"}),
    (MomentumViT, {"tokenizer": "spt", "attn_layer": "lsa", "qkv_bias": False}),  # the small-dataset recipe
]
CASES = FAMILY_CASES + OPTION_CASES + COMPOSED_CASES
#: each class and each part once, for the costlier checks elsewhere (graph capture, the GPU)
PARTS = FAMILY_CASES + OPTION_CASES

#: options that choose a part (the rest are sizes and rates), and their old spellings
CHOICES = ("attn_layer", "tokenizer", "head", "transition")
OLD_SPELLINGS = {"patch_embed": "tokenizer", "stem": "tokenizer"}


def case_id(case) -> str:
    cls, options = case
    return "-".join([cls.__name__, *(f"{k}={v}" for k, v in options.items())])


def build(case, **overrides):
    """The case at its contract size: 16 px images in 4 px patches (a 4 x 4 grid; quadtree leaves of 16-4 px),
    width 32, two blocks, 5 classes, dropout and drop-path on (see `tiny_model`)."""
    cls, options = case
    return tiny_model(cls, img_size=16, patch_size=4, **{**options, **overrides})


def segments(model) -> bool:
    return model.vitlab_args.get("head") == "segment"


def forward_head(model, feats, x, **kw):
    """`forward_head` with the token boxes a segmentation head paints into."""
    tokens = model.tokenize(x) if segments(model) else None
    return model.forward_head(feats, tokens=tokens, **kw)


cases = pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))


def test_every_registered_name_builds_and_its_class_and_choices_are_cases():
    """The registry's share of the contracts: each name's arguments are its class's, it builds at a tiny
    size, and the class and each choice it makes are contract cases above."""
    covered_classes = {cls for cls, _ in CASES}
    covered = {(k, v) for _, options in CASES for k, v in options.items()}
    defaults = {(k, p.default) for cls in covered_classes for k, p in builder_parameters(cls).items()}
    kinds = {}  # names that differ in sizes alone build the same tiny model: one build per kind
    for name in list_models():
        entry, args = model_entry(name), model_args(name)
        params = builder_parameters(entry.builder)
        assert set(args) <= set(params), f"{name}: {sorted(set(args) - set(params))} are not arguments"
        assert entry.builder in covered_classes, f"{name}: {entry.builder.__name__} has no contract case"
        for key, value in entry.defaults.items():
            key = OLD_SPELLINGS.get(key, key)
            if key in CHOICES:
                assert (key, value) in covered | defaults, f"{name}: no contract case has {key}={value}"
        choices = {k: v for k, v in entry.defaults.items() if k not in SIZE_ARGS}
        kinds.setdefault((entry.builder, repr(sorted(choices.items()))), name)
    for name in kinds.values():
        tiny_model(name)


@cases
def test_forward_backward_every_parameter_gets_gradient(case):
    torch.manual_seed(0)
    model = build(case).train()
    out = as_output(model(model_input(model)))
    size = model.vitlab_args["img_size"]
    assert out.logits.shape == ((3, 5, size, size) if segments(model) else (3, 5))
    assert torch.isfinite(out.logits).all()
    (out.logits.square().mean() + sum(out.losses.values())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@cases
def test_eval_is_deterministic_and_per_sample(case):
    """Eval output is a function of the sample alone: the same twice, and independent of its batch."""
    torch.manual_seed(0)
    model = build(case).eval()
    x = model_input(model, batch=4)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, out, rtol=1e-5, atol=1e-5)


@cases
def test_rebuilt_from_checkpoint_metadata_gives_identical_outputs(case, tmp_path):
    torch.manual_seed(0)
    model = build(case).eval()
    config = vitlab.load_config(None, [f"model.name={model.vitlab_name}"]).dump()
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file,
              metadata=model_metadata(model, config))
    rebuilt, cfg, _ = load_checkpoint(file)
    assert type(rebuilt) is type(model) and rebuilt.vitlab_args == model.vitlab_args
    x = model_input(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert json.loads(json.dumps(model.vitlab_args)) == model.vitlab_args  # metadata is plain JSON


@cases
def test_state_dict_round_trip(case):
    torch.manual_seed(0)
    a = build(case).eval()
    torch.manual_seed(1)
    b = build(case).eval()
    x = model_input(a)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))


@cases
def test_timm_interface_and_intermediates(case):
    """forward = forward_head(forward_features); forward_intermediates lists the blocks' outputs."""
    torch.manual_seed(0)
    model = build(case).eval()
    x = model_input(model, batch=2)
    depth = len(model.blocks)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features
        assert torch.equal(forward_head(model, feats, x), model(x))
        assert forward_head(model, feats, x, pre_logits=True).shape[-1] == model.num_features
        final, outs = model.forward_intermediates(x)
        assert len(outs) == depth and all(t.shape[0] == 2 and t.ndim == 3 for t in outs)
        torch.testing.assert_close(final, feats)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], outs[-1])
        assert model.forward_intermediates(x, indices=[0], intermediates_only=True)[0].shape == outs[0].shape
    assert isinstance(model.architecture, str) and model.architecture


REFERENCE_SHAPED = [c for c in CASES if c[0] not in (StagedViT, GDTViT)
                    and c[1].get("tokenizer", "patch") in ("patch", "spt", "spt_paper")]


@pytest.mark.parametrize("case", REFERENCE_SHAPED, ids=map(case_id, REFERENCE_SHAPED))
def test_same_seed_starts_from_the_reference_weights(case):
    """Every family that keeps the reference's block widths and token grid builds and initialises once, in the
    reference's order: at one seed, each parameter it shares with the reference ViT of the same options (same
    name and shape) has the same values (a wider head, BDIA's quantiser, momentum or routers change nothing
    else). Staged ViTs interleave transitions between their blocks, and quadtree and conv-stem tokenizers
    draw tables or convolutions of other sizes first, so they are not expected to."""
    torch.manual_seed(0)
    model = build(case)
    args = {k: v for k, v in model.vitlab_args.items() if k in model_args(registered_name(VisionTransformer))}
    torch.manual_seed(0)
    ref = vitlab.create_model(registered_name(VisionTransformer), **args)
    ours, theirs = model.state_dict(), ref.state_dict()
    shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
    assert len(shared) >= len(theirs) // 2
    assert [k for k in shared if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.slow
@cases
def test_compile_equals_eager(case):
    torch.manual_seed(0)
    model = build(case).eval()
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
