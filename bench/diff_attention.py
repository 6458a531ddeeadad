"""Differential attention (V1 and V2) vs classic attention: forward + backward time, one process.

    python bench/diff_attention.py                  # CPU, fp32
    python bench/diff_attention.py --device cuda    # bf16 autocast, eager and torch.compile

Seed 002's 10M pair (`vit_classic_10m` / `vit_differential_10m`: 224 px, d_model 256, 12 blocks; parameter
counts within 0.1%) at patch 8 (785 tokens) and patch 16 (197 tokens). The models alternate in rounds;
each row reports median img/s and the time ratio differential / classic (target: <= 1.3). On CPU the
differential model runs twice: with its default tiled kernel (maps subtracted before multiplying V:
classic-layer matmul FLOPs) and with the padded `scaled_dot_product_attention` kernel it uses elsewhere
(`vitlab.layers.diff_kernels`), whose attention matmuls cost 2x the classic ones. Differential attention V2
(`vit_differential_v2_10m`: the classic heads, twice the queries, one plain SDPA call over them, a sigmoid lambda
per token and head; 1/12 more parameters) runs in the same rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402
from vitlab.layers import diff_kernels  # noqa: E402


def fwd_bwd(model, device, amp: bool, compile_: bool, force_sdpa: bool = False):
    fn = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def step(x):
        diff_kernels.FORCE_SDPA = force_sdpa
        with ctx():
            out = fn(x)
        out.float().square().mean().backward()
        diff_kernels.FORCE_SDPA = False
    return step


def timed(step, x, steps: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--patches", type=int, nargs="+", default=[8, 16], help="patch sizes to time (default: 8 16)")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    rounds, steps = args.rounds or (10 if cuda else 3), args.steps or (10 if cuda else 1)
    modes = [("bf16", True, False), ("bf16+compile", True, True)] if cuda else [("fp32", False, False)]
    batch = {8: 64 if cuda else 2, 16: 256 if cuda else 8}
    cases = [(patch, batch.get(patch, 64 if cuda else 4)) for patch in args.patches]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# forward+backward, differential V1 and V2 vs classic (seed 002's 10M models, 224 px), {where}, torch "
          f"{torch.__version__}, median of {rounds} alternating rounds x {steps} steps\n")
    sdpa_col = "" if cuda else " differential, SDPA kernel img/s | its time ratio |"
    print(f"| patch | tokens | mode | batch | classic img/s | differential img/s | time ratio diff/classic |{sdpa_col}"
          " V2 img/s | time ratio V2/classic |")
    print("|---:|---:|---|---:|---:|---:|---:|" + ("" if cuda else "---:|---:|") + "---:|---:|")
    for patch, batch in cases:
        for mode, amp, compile_ in modes:
            torch.manual_seed(0)
            models = {k: vitlab.create_model(f"vit_{k}_10m", patch_size=patch).to(device)
                      for k in ("classic", "differential", "differential_v2")}
            steps_ = {k: fwd_bwd(m, device, amp, compile_) for k, m in models.items()}
            if not cuda:
                steps_["sdpa"] = fwd_bwd(models["differential"], device, amp, compile_, force_sdpa=True)
            x = torch.randn(batch, 3, 224, 224, device=device)
            for s in steps_.values():
                timed(s, x, 2 if compile_ else 1, device)
            rates = {k: [] for k in steps_}
            for r in range(rounds):
                for k in (list(steps_) if r % 2 == 0 else list(steps_)[::-1]):
                    rates[k].append(timed(steps_[k], x, steps, device))
            c, d = statistics.median(rates["classic"]), statistics.median(rates["differential"])
            row = f"| {patch} | {(224 // patch) ** 2 + 1} | {mode} | {batch} | {c:,.2f} | {d:,.2f} | {c / d:.3f} |"
            if "sdpa" in rates:
                p = statistics.median(rates["sdpa"])
                row += f" {p:,.2f} | {c / p:.3f} |"
            v2 = statistics.median(rates["differential_v2"])
            row += f" {v2:,.2f} | {c / v2:.3f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
