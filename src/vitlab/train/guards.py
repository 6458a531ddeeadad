"""Non-finite values: a training loss, a gradient norm or the weights that stop being finite end the run with
one line (TrainingDiverged) before anything is saved, or, under train.skip_nonfinite_steps=N, up to N bad
optimizer steps are dropped. Each check reads the device once, where the loop synchronises anyway."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import TrainingDiverged
from .distributed import all_reduce_sum


def step_is_bad(group_finite: torch.Tensor, norm: torch.Tensor) -> bool:
    """Whether the optimizer step of a group whose losses were `group_finite` and whose gradient norm is `norm`
    is to be skipped: one host sync, agreed over ranks."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    bad = (~group_finite | ~torch.isfinite(norm)).float()
    return all_reduce_sum(bad).item() > 0


def too_many_skipped(skipped: int, limit: int) -> None:
    if skipped > limit:
        raise TrainingDiverged(f"{skipped} non-finite steps, more than train.skip_nonfinite_steps="
                               f"{limit}; the last checkpoint is intact: lower optim.lr or set optim.clip_grad")


def check_losses_finite(epoch: int, first_batch: int, steps: list[int], records: list[dict[str, float]],
                        skipped_batches: set[int]) -> None:
    """Stop at the first non-finite training loss, at a flush (values already on the host: no extra sync),
    before anything is saved; batches of skipped steps are allowed."""
    for i, rec in enumerate(records):
        batch = first_batch + i
        if not math.isfinite(rec["loss"]) and batch not in skipped_batches:
            raise TrainingDiverged(
                f"the training loss is {rec['loss']} at epoch {epoch}, batch {batch} (step {steps[i]}); "
                f"stopped, the last checkpoint is intact. Lower optim.lr, set optim.clip_grad=1.0, prefer "
                f"train.amp=bf16 to fp16, or let train.skip_nonfinite_steps=N skip rare bad batches")


def check_weights_finite(model: nn.Module, epoch: int, step: int) -> None:
    """No checkpoint is written from non-finite weights (a last step can make them so after its own finite
    loss); one host sync."""
    # FSDP's parameters are DTensors: each rank checks its own shard, then one sum over ranks
    params = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).sum().float()
    if all_reduce_sum(bad).item() > 0:
        raise TrainingDiverged(f"the weights are no longer finite after epoch {epoch} (step {step}); "
                               f"stopped, the last checkpoint is intact. Lower optim.lr or set optim.clip_grad=1.0")
