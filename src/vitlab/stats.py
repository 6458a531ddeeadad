"""Model statistics: parameters and forward GFLOPs (MACs) on the meta device; bytes saved for backward."""
from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


# torch counts the CUDA attention kernels but not CPU's fused one; without these, FLOPs counted on a real CPU
# model (data-dependent routing cannot run on the meta device) would miss every attention matmul.
@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

from .registry import create_model, model_entry


def model_stats(name: str, **overrides) -> dict[str, float]:
    static = getattr(model_entry(name).builder, "static_flops_args", {})
    with torch.device("meta"):
        model = create_model(name, **{**overrides, **static})
    a = model.vitlab_args
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": _count_gflops(model),
            "img_size": a["img_size"]}


def forward_gflops(model: torch.nn.Module) -> float:
    """Multiply-accumulates (billions) of one eval-mode forward pass of one image at `model`'s resolution,
    counted on a meta-device copy rebuilt from its registry name and arguments: nothing is allocated or
    computed, and every op there has a FLOP formula (CPU's fused flash-attention kernel has none, so counting
    a real CPU model would miss the attention matmuls)."""
    with torch.device("meta"):
        args = {**model.vitlab_args, **getattr(model, "static_flops_args", {})}
        return _count_gflops(create_model(model.vitlab_name, **args))


def _count_gflops(meta_model: torch.nn.Module) -> float:
    a = meta_model.vitlab_args
    x = torch.empty(1, a["in_chans"], a["img_size"], a["img_size"], device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model.eval()(x)
    return counter.get_total_flops() / 2e9


class MemoryMeter:
    """Peak memory of a stretch of work: on CUDA the allocator's peak allocated bytes, on CPU the process's
    peak resident set (Linux: VmHWM, reset at `start` through /proc/self/clear_refs, so the peak belongs to
    this stretch and not to data loading before it; elsewhere ru_maxrss, which cannot be reset).

    `read()` -> {"peak_memory_mb": the peak, "train_memory_mb": the peak above the level at `start` (what
    the work itself added: activations, gradients, optimizer state), "peak_memory_kind": what was measured}."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, 0.0

    def start(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = _status_mb("VmRSS") or 0.0
        return self

    def read(self) -> dict[str, float | str | None]:
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device) / 2 ** 20, "cuda_max_allocated"
        elif (hwm := _status_mb("VmHWM")) is not None:
            peak, kind = hwm, "process_peak_rss"
        else:
            peak, kind = _max_rss_mb(), "process_max_rss"
        above = None if peak is None else max(peak - self.base, 0.0)
        return {"peak_memory_mb": peak, "train_memory_mb": above, "peak_memory_kind": kind}


def _status_mb(key: str) -> float | None:
    """A kB field of /proc/self/status (Linux) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2 ** 10
    except OSError:
        pass
    return None


def _max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


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
