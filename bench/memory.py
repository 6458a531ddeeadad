"""Activation memory and step time of the memory-saving ViTs vs the standard ViT, by depth.

    python bench/memory.py                  # CPU: width 128, 65 tokens, batch 32; depths 6 12 24 48
    python bench/memory.py --device cuda    # + peak allocated GPU memory

Per model (vit, rev, bdia, momentum) and depth, in a fresh subprocess each:
- saved: bytes the forward pass leaves for backward (torch.autograd.graph.saved_tensors_hooks, which also
  sees what the custom Functions save), plus BDIA's packed side bits ((depth - 1) x ceil(elements / 8) bytes,
  kept on the Function's context where the hooks cannot see them);
- peak: peak process memory during one training step above the memory before it (CPU: ru_maxrss), or peak
  allocated CUDA memory;
- step: median time of forward + backward + AdamW.
Ratios are to the standard ViT at the same depth; the last lines give each model's peak growth from the first
to the last depth relative to the ViT's (issue 12's measure: `--depths 6 24 --width 512 --batch 64`).

CPU peaks are process memory, so they depend on the allocator: by default the children run with glibc's mmap
threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so a freed activation-sized buffer goes back to the OS
and the peak is what is live. `--glibc-dynamic` keeps glibc's default, whose threshold rises to the largest
freed block (up to 32 MiB): the backward's per-block recompute buffers then stay in the heap and show up as
growth with depth although nothing holds them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402
from vitlab.stats import saved_for_backward  # noqa: E402

MODELS = {"vit": "vit_mini_patch4_32", "rev": "rev_vit_mini_patch4_32", "bdia": "bdia_vit_mini_patch4_32",
          "momentum": "momentum_vit_mini_patch4_32"}


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure_one(kind: str, depth: int, width: int, batch: int, device: str, steps: int) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = vitlab.create_model(MODELS[kind], depth=depth, embed_dim=width, num_heads=width // 32,
                                num_classes=10).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(10, (batch,), device=dev)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Peak first, in a process that has run nothing else: allocate AdamW's state with zero gradients, take
    # the memory in use as the base, then one real step (ru_maxrss cannot be reset, so order matters).
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base

    saved, loss = saved_for_backward(lambda: torch.nn.functional.cross_entropy(model(x), y))
    loss.backward()
    opt.zero_grad(set_to_none=True)
    if kind == "bdia":
        tokens = model.tokenizer.num_tokens + model.num_prefix_tokens
        saved += (depth - 1) * -(-(batch * tokens * width) // 8)

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"saved": saved, "peak": max(peak, 0), "step": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depths", type=int, nargs="*", default=[6, 12, 24, 48])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--glibc-dynamic", action="store_true", help="keep glibc's dynamic mmap threshold")
    p.add_argument("--one", nargs=2, metavar=("KIND", "DEPTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.width, args.batch, args.device,
                                     args.steps)))
        return
    print(f"# activation memory by depth: width {args.width}, 65 tokens (patch 4 on 32 px), batch {args.batch}, "
          f"{args.device}, torch {torch.__version__}\n")
    print("| depth | model | saved for backward (MiB) | ratio | peak step memory (MiB) | ratio | step (s) | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    env = dict(os.environ) if args.glibc_dynamic else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                                                       "MALLOC_TRIM_THRESHOLD_": "131072"}
    peaks: dict[str, list[float]] = {kind: [] for kind in MODELS}
    for depth in args.depths:
        rows = {}
        for kind in MODELS:
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(depth), "--device", args.device,
                                  "--width", str(args.width), "--batch", str(args.batch), "--steps",
                                  str(args.steps)], capture_output=True, text=True, check=True, env=env)
            rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[kind].append(rows[kind]["peak"])
        ref = rows["vit"]
        for kind, r in rows.items():
            print(f"| {depth} | {kind} | {r['saved'] / 2**20:.1f} | {r['saved'] / ref['saved']:.3f} | "
                  f"{r['peak'] / 2**20:.1f} | {r['peak'] / max(ref['peak'], 1):.3f} | {r['step']:.3f} | "
                  f"{r['step'] / ref['step']:.2f} |", flush=True)
    if len(args.depths) > 1:
        growth = {kind: p[-1] - p[0] for kind, p in peaks.items()}
        print(f"\npeak growth from depth {args.depths[0]} to {args.depths[-1]}, relative to the ViT's "
              f"(+{growth['vit'] / 2**30:.2f} GiB): "
              + ", ".join(f"{kind} {g / growth['vit']:.3f}" for kind, g in growth.items() if kind != "vit"))


if __name__ == "__main__":
    main()
