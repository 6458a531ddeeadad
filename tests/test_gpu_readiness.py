"""What makes GPU training fast, checked here on CPU: every family's forward traces into one graph for
torch.compile (invertible stacks: each block's branches, compiled per block), the training step never waits
on the device between metric flushes, and CUDA runs get the fused optimizer kernels. The GPU itself is
exercised by tests/test_gpu.py (`pytest -m gpu`)."""
import os
import sys

import pytest
import torch

from conftest import QUICK, model_input, run_subprocess, tiny_model
from test_contracts import PARTS, build, case_id
from vitlab.config import OptimConfig, load_config
from vitlab.layers.reversible import InvertibleStack
from vitlab.train.distributed import parallelize
from vitlab.train.optim import build_optimizer
from vitlab.train.trainer import Trainer

INVERTIBLE = ["rev_vit_micro_patch2_8", "momentum_vit_micro_patch2_8", "bdia_vit_micro_patch2_8"]
ONE_GRAPH = [case for case in PARTS if not issubclass(case[0], InvertibleStack)]


def graph_breaks(fn, *args) -> list[str]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


@pytest.mark.parametrize("case", ONE_GRAPH, ids=map(case_id, ONE_GRAPH))
def test_training_forward_is_one_graph(case):
    """Train mode (dropout, drop-path, Gumbel draws, routing on): Dynamo captures the whole forward, for every
    family that is not invertible and every swappable part."""
    model = build(case).train()
    assert graph_breaks(model, model_input(model)) == []


@pytest.mark.parametrize("name", INVERTIBLE)
def test_invertible_stacks_compile_per_block_without_breaks(name):
    """The memory-saving backward is eager by design (a custom Function that calls autograd.grad); what it
    evaluates, each block's attention and MLP, is one graph each, and so is the whole model in eval."""
    model = tiny_model(name).train()
    x = model_input(model)
    tokens = model.embed(x)
    for block in model.blocks:
        assert graph_breaks(block.attn, block.norm1(tokens)) == []
        assert graph_breaks(block.mlp, block.norm2(tokens)) == []
    with torch.no_grad():
        assert graph_breaks(model.eval(), x) == []


def test_compile_wraps_plain_models_and_compiles_invertible_blocks_in_place():
    plain = tiny_model("vit_micro_patch2_8")
    assert hasattr(parallelize(plain, torch.device("cpu"), "ddp", compile=True), "_orig_mod")
    rev = tiny_model("rev_vit_micro_patch2_8")
    names = list(rev.state_dict())
    assert parallelize(rev, torch.device("cpu"), "ddp", compile=True) is rev
    assert all(b.attn._compiled_call_impl is not None and b.mlp._compiled_call_impl is not None for b in rev.blocks)
    assert list(rev.state_dict()) == names  # checkpoints keep their keys


@pytest.mark.slow
@pytest.mark.parametrize("name", INVERTIBLE)
def test_regionally_compiled_invertible_stack_replays_dropout(name):
    """Compiled branches inside the memory-saving backward: the gradients equal plain autograd's through the
    same compiled branches on the same random draws (dropout and drop-path on; compiled kernels draw other
    numbers than eager ones, so both sides are compiled)."""
    torch.manual_seed(0)
    plain = tiny_model(name, memory_efficient=False).train()
    saving = tiny_model(name).train()
    saving.load_state_dict(plain.state_dict())
    x = model_input(plain)
    for model in (plain, saving):
        parallelize(model, torch.device("cpu"), "ddp", compile=True)
        torch.manual_seed(1)
        model(x).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


class SyncCounter:
    """Counts the Python-level calls that copy a tensor's value to the host (on a GPU each one waits for the
    device). Not counted: reads of tensors that live on the host by design, namely torch's foreach optimizers'
    step counts and the invertible stacks' per-pass seed (drawn from torch's CPU generator)."""

    HOST_SIDE = {("reversible.py", "new_pass")}

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)

            def counted(t, *a, _original=original, _method=method, **kw):
                frame = sys._getframe(1)
                caller = frame.f_code.co_filename
                if f"torch{os.sep}optim{os.sep}" not in caller and \
                        (os.path.basename(caller), frame.f_code.co_name) not in self.HOST_SIDE:
                    self.calls.append(f"{_method} at {caller}:{frame.f_lineno}")
                return _original(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, method, counted)


@pytest.mark.parametrize("name", ["vit_micro_patch2_8", "resvit_micro_patch2_8", "bdia_vit_micro_patch2_8",
                                  "diff_vit_micro_patch2_8"])
def test_training_steps_never_read_device_values_between_flushes(name, tmp_path, monkeypatch):
    """Training 3 or 9 steps costs the same host reads (those at the epoch's end): none per step."""
    def host_reads(steps: int) -> list[str]:
        cfg = load_config(None, QUICK + [f"output.dir={tmp_path / str(steps)}", f"model.name={name}",
                                         "train.epochs=1", f"train.max_steps={steps}", "train.log_every=1000",
                                         "train.batch_size=16", "data.max_train_samples=200"])
        trainer = Trainer(cfg)
        counter = SyncCounter(monkeypatch)
        trainer._train_epoch(0)
        monkeypatch.undo()
        trainer.release()
        return counter.calls

    assert host_reads(9) == host_reads(3)


def test_cuda_runs_get_the_fused_optimizer_kernels():
    """One kernel launch updates every parameter on CUDA (the decision is the device's; CPU keeps foreach)."""
    model = tiny_model("vit_micro_patch2_8")
    for name in ("adamw", "sgd"):
        cfg = OptimConfig(name=name)
        assert build_optimizer(model, cfg, torch.device("cuda")).defaults["fused"] is True
        assert build_optimizer(model, cfg, torch.device("cpu")).defaults["foreach"] is True


@pytest.mark.slow
def test_gpu_bench_pipeline_runs_tiny_on_cpu(tmp_path):
    """`make bench-gpu` runs every part and writes one dated section (here tiny, on CPU, into a copy)."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# bench results\n")
    run = run_subprocess(["bench/gpu.py", "--smoke", "--device", "cpu", "--results", results], timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# bench results\n") and text.count("## GPU benchmarks (") == 1
    for title in ("Training throughput vs timm", "DDP at world size 1", "Differential vs classic attention",
                  "Memory-saving ViTs by depth", "MFU", "Routed and adaptive inference"):
        assert f"### {title}" in text
    assert "failed (exit" not in text and text.count("x |") >= 2
