"""Model statistics: parameters and forward GFLOPs (MACs) on the meta device; bytes saved for backward."""
from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model


def model_stats(name: str, **overrides) -> dict[str, float]:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    a = model.vitlab_args
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": forward_gflops(model),
            "img_size": a["img_size"]}


def forward_gflops(model: torch.nn.Module) -> float:
    """Multiply-accumulates (billions) of one eval-mode forward pass of one image at the model's resolution.
    Build the model on the meta device to count without allocating or computing anything."""
    a = model.vitlab_args
    x = torch.empty(1, a["in_chans"], a["img_size"], a["img_size"], device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    with counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    """(peak MiB, what it measures): CUDA peak allocated memory, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10), "process_max_rss"


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
