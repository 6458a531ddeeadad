"""GPU contracts (`make test-gpu`, i.e. `pytest -m gpu`; skipped without CUDA): every family trains a step
in bf16 autocast, the reference attention runs on a fused SDPA kernel, fp16 trains with the grad scaler,
compiled equals eager, the reversible families replay dropout on CUDA, the training step never synchronises
with the host, CUDA runs get the fused optimizer, and a one-process NCCL group trains."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import QUICK, ROOT, model_input, tiny_model
from test_contracts import CASES, PARTS, build, case_id
from test_distributed import clean_env, free_port
from test_gpu_readiness import INVERTIBLE
from vitlab.config import load_config
from vitlab.objective import as_output
from vitlab.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
ON_CUDA = QUICK + ["train.device=cuda", "data.max_train_samples=512", "train.epochs=1"]


@pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
def test_bf16_autocast_training_step(case):
    torch.manual_seed(0)
    model = build(case).to(CUDA).train()
    x = model_input(model).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = as_output(model(x))
    assert out.logits.dtype == torch.bfloat16
    (out.logits.float().square().mean() + sum(t.float() for t in out.losses.values())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_reference_attention_runs_on_a_fused_sdpa_kernel():
    """With the math fallback switched off, the plain ViT still trains: its attention is flash or
    memory-efficient SDPA (head dim 32, bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny_model("vit_micro_patch2_8", embed_dim=64, num_heads=2).to(CUDA).train()
    x = model_input(model).to(CUDA)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()


def test_fp16_trains_with_the_grad_scaler(tmp_path):
    cfg = load_config(None, ON_CUDA + [f"output.dir={tmp_path}", "train.amp=fp16"])
    trainer = Trainer(cfg)
    results = trainer.fit()
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0
    assert results["test_top1"] > 0.2 and results["device"].startswith("cuda")


@pytest.mark.parametrize("case", PARTS, ids=map(case_id, PARTS))
def test_compiled_equals_eager(case):
    torch.manual_seed(0)
    model = build(case).to(CUDA).eval()
    x = model_input(model).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", INVERTIBLE)
def test_reversible_dropout_replay_on_cuda(name):
    """The memory-saving backward replays CUDA dropout and drop-path draws: gradients equal autograd's."""
    torch.manual_seed(0)
    plain = tiny_model(name, memory_efficient=False).to(CUDA).train()
    saving = tiny_model(name).to(CUDA).train()
    saving.load_state_dict(plain.state_dict())
    x = model_input(plain).to(CUDA)
    for model in (plain, saving):
        torch.manual_seed(1)
        model(x).square().mean().backward()
    for (n, a), b in zip(plain.named_parameters(), saving.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["vit_micro_patch2_8", "resvit_micro_patch2_8", "rev_vit_micro_patch2_8",
                                  "diff_vit_micro_patch2_8"])
def test_training_step_never_synchronises_and_uses_fused_adamw(name, tmp_path):
    """Under torch.cuda.set_sync_debug_mode("error"), forward, backward and the optimizer step run without a
    host-device synchronisation (metric flushes, which read values on purpose, are outside the check)."""
    cfg = load_config(None, ON_CUDA + [f"output.dir={tmp_path}", f"model.name={name}", "train.log_every=1000",
                                       "train.max_steps=4", "optim.clip_grad=1.0"])
    trainer = Trainer(cfg)
    assert trainer.optimizer.defaults["fused"] is True
    step = trainer._train_batch

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    trainer._train_batch = checked
    trainer._train_epoch(0)
    assert trainer.step == 4
    trainer.release()


def test_one_process_nccl_group_trains(tmp_path):
    """torchrun with one GPU process: the NCCL process group, DDP and the fused optimizer together."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
    run = subprocess.run([*torchrun, "-m", "vitlab", "train", "--output", str(tmp_path), *ON_CUDA],
                         env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["world_size"] == 1 and results["device"].startswith("cuda")
    assert "nccl" in next(tmp_path.rglob("train.log")).read_text()
