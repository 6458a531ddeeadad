"""Model statistics: parameters and forward GFLOPs (MACs) on the meta device; bytes saved for backward."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model


def model_stats(name: str, **overrides) -> dict[str, float]:
    with torch.device("meta"):
        model = create_model(name, **overrides)
        a = model.vitlab_args
        x = torch.empty(1, a["in_chans"], a["img_size"], a["img_size"])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": counter.get_total_flops() / 2e9,
            "img_size": a["img_size"]}


def saved_for_backward(fn):
    """(bytes autograd keeps for backward while `fn()` runs, fn's result). Custom autograd Functions'
    `save_for_backward` tensors are counted too; state they keep elsewhere on `ctx` is not."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out
