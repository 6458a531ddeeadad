"""Model statistics without allocating weights: parameters and forward GFLOPs (MACs), on the meta device."""
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
