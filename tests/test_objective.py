"""The objective protocol: a model may return auxiliary loss terms and metrics and follow training progress;
the trainer adds, logs and reduces them without knowing the model (a tiny model defined here)."""
import json

import pytest
import torch

from conftest import QUICK
from vitlab.config import load_config
from vitlab.models import VisionTransformer
from vitlab.objective import ModelOutput
from vitlab.registry import register_model, unregister_model
from vitlab.train import train


class ProgressViT(VisionTransformer):
    """A ViT with an auxiliary penalty on its logits whose weight follows training progress."""

    def __init__(self, *args, aux_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weight, self.progress = aux_weight, 0.0
        self.calls: list[tuple[int, int]] = []

    def set_progress(self, step: int, total_steps: int) -> None:
        self.calls.append((step, total_steps))
        self.progress = step / total_steps

    def forward(self, x):
        logits = super().forward(x)
        if not self.training:
            return logits
        weight = torch.tensor(self.aux_weight * (1 - self.progress))
        return ModelOutput(logits, losses={"penalty": weight * logits.square().mean()},
                           metrics={"weight": weight, "logit_norm": logits.norm(dim=-1).mean()})


@pytest.fixture
def progress_vit():
    register_model("test_progress_vit", ProgressViT, img_size=8, patch_size=2, embed_dim=32,
                   depth=1, num_heads=2)
    yield "test_progress_vit"
    unregister_model("test_progress_vit")


def test_trainer_adds_logs_and_schedules_auxiliary_terms(progress_vit, tmp_path):
    cfg = load_config(None, [*QUICK, f"model.name={progress_vit}", "model.depth=1", "model.aux_weight=0.8",
                             f"output.dir={tmp_path}", "train.epochs=2", "train.log_every=7"])
    results = train(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "train_batch"]
    steps = len(batches)
    assert steps == 2 * 21 and results["test_samples"] == 359
    for r in batches:
        assert r["loss"] == pytest.approx(r["ce"] + r["penalty"], rel=1e-5)  # every term is in the objective
        assert r["weight"] == pytest.approx(0.8 * (1 - (r["step"] - 1) / steps), rel=1e-5)  # progress hook
        assert r["logit_norm"] > 0
    assert batches[-1]["penalty"] < batches[0]["penalty"]
    log = (cfg.run_dir / "train.log").read_text()
    assert " penalty " in log and " weight " in log
    assert results["model_args"]["aux_weight"] == 0.8


def test_plain_models_log_no_extra_terms(trained_run):
    run_dir, _ = trained_run
    batch = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"train_batch"' in line)
    assert set(batch) == {"kind", "epoch", "batch", "step", "loss", "acc", "lr"}
