"""The objective protocol between models and the trainer.

In training a model may return, instead of bare logits, a `ModelOutput`: the logits plus named auxiliary
loss terms (a router's keep-ratio loss, a distillation term, ...) and named metrics to log (a keep ratio,
an entropy). The trainer adds every loss term to the cross-entropy, logs every term and metric per batch
(metrics.jsonl, TensorBoard, train.log), averages them over ranks, and never asks which model it runs.
A model whose schedule follows training (a keep-ratio target that decays) overrides
`VisionTransformer.set_progress(step, total_steps)`, which the trainer calls before every batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, classes)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar terms added to the objective
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars logged, not optimised


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the batch mean (Hinton et al. 2015: the T^2 keeps
    the soft target's gradients on the hard target's scale as T changes)."""
    t = temperature
    log_student = torch.log_softmax(student / t, dim=-1)
    log_teacher = torch.log_softmax(teacher / t, dim=-1)
    return t * t * torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def as_output(out: torch.Tensor | ModelOutput) -> ModelOutput:
    """Bare logits are a `ModelOutput` with no auxiliary terms."""
    return out if isinstance(out, ModelOutput) else ModelOutput(out)
