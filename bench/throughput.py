"""Training throughput of vitlab's ViT vs timm's, same config, same weights, same optimizer, one process.

    python bench/throughput.py                      # CPU: ViT-S/16 at 224 and two small-image configs
    python bench/throughput.py --device cuda        # + bf16 autocast, eager and torch.compile

A step is forward + backward + AdamW. The two models alternate in rounds (ours, timm, ours, ...) so that
clock and thermal drift hit both alike; each row reports the median img/s over rounds and the ratio
ours / timm (> 1: we are faster). Absolute numbers mean something only on a GPU; on a shared CPU compare
the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402

try:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
except ImportError:  # pragma: no cover
    sys.exit("bench/throughput.py needs timm (pip install -e '.[dev]')")

TIMM_ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "qkv_bias", "class_token", "global_pool", "init_values")

CPU_CASES = [("vit_small_patch16_224", 8, {}), ("vit_tiny_patch4_32", 64, {"num_classes": 10}),
             ("vit_micro_patch7_28", 128, {"in_chans": 1, "num_classes": 10})]
CUDA_CASES = [("vit_small_patch16_224", 128, {}), ("vit_base_patch16_224", 64, {}),
              ("vit_large_patch16_224", 32, {}), ("vit_tiny_patch4_32", 512, {"num_classes": 10})]


def make_pair(name: str, device: torch.device, overrides: dict):
    torch.manual_seed(0)
    ours = vitlab.create_model(name, **overrides)
    theirs = TimmViT(**{k: ours.vitlab_args[k] for k in TIMM_ARGS})
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device), theirs.to(device)


def step_fn(model, device: torch.device, amp: bool, compile_: bool):
    opts = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **opts)
    fwd = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def step(x, y):
        with ctx():
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, x, y, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t)


def bench_case(name, batch, overrides, device, amp, compile_, steps, rounds, warmup):
    ours, theirs = make_pair(name, device, overrides)
    a = ours.vitlab_args
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"], device=device)
    y = torch.randint(a["num_classes"], (batch,), device=device)
    steps_ = {"ours": step_fn(ours, device, amp, compile_), "timm": step_fn(theirs, device, amp, compile_)}
    for s in steps_.values():
        measure(s, x, y, warmup, device)
    rates = {"ours": [], "timm": []}
    for r in range(rounds):
        order = ("ours", "timm") if r % 2 == 0 else ("timm", "ours")
        for key in order:
            rates[key].append(measure(steps_[key], x, y, steps, device))
    return statistics.median(rates["ours"]), statistics.median(rates["timm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per model (default 5 CPU, 10 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 2 CPU, 20 CUDA)")
    p.add_argument("--models", nargs="*", help="restrict to these model names")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    rounds = args.rounds or (10 if cuda else 5)
    steps = args.steps or (20 if cuda else 2)
    modes = [("bf16", True, False), ("bf16+compile", True, True)] if cuda else [("fp32", False, False)]
    cases = [c for c in (CUDA_CASES if cuda else CPU_CASES) if not args.models or c[0] in args.models]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    import timm
    print(f"# training throughput (forward+backward+AdamW), {where}, torch {torch.__version__}, "
          f"timm {timm.__version__}, median of {rounds} alternating rounds x {steps} steps\n")
    print("| model | mode | batch | vitlab img/s | timm img/s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for name, batch, overrides in cases:
        for mode, amp, compile_ in modes:
            ours, theirs = bench_case(name, batch, overrides, device, amp, compile_, steps, rounds,
                                      warmup=3 if compile_ else 1)
            print(f"| {name} | {mode} | {batch} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.3f} |", flush=True)


if __name__ == "__main__":
    main()
