"""Cost of the data-parallel code path at world size 1: plain module vs DistributedDataParallel, one process.

    python bench/ddp_overhead.py                    # CPU (gloo)
    python bench/ddp_overhead.py --device cuda      # one GPU (NCCL), bf16, eager and torch.compile

Both sides are the same vitlab model (same weights) wrapped by `vitlab.train.distributed.parallelize`, exactly
as the trainer does under torchrun with one process; a step is forward + backward + AdamW. They alternate in
rounds, and each row reports the median img/s and the ratio DDP / plain (the target on a GPU: >= 0.98).
"""
from __future__ import annotations

import argparse
import copy
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402
from throughput import measure, step_fn  # noqa: E402  (bench/ is the script's directory)
from vitlab.train.distributed import parallelize  # noqa: E402

CPU_CASES = [("vit_micro_patch7_28", 128, {"in_chans": 1, "num_classes": 10}),
             ("vit_tiny_patch4_32", 64, {"num_classes": 10})]
CUDA_CASES = [("vit_small_patch16_224", 128, {}), ("vit_base_patch16_224", 64, {})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5 CPU, 10 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 3 CPU, 20 CUDA)")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    rounds, steps = args.rounds or (10 if cuda else 5), args.steps or (20 if cuda else 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    modes = [("bf16", True, False), ("bf16+compile", True, True)] if cuda else [("fp32", False, False)]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# world-size-1 DDP vs plain (forward+backward+AdamW), {where}, torch {torch.__version__}, "
          f"median of {rounds} alternating rounds x {steps} steps\n")
    print("| model | mode | batch | plain img/s | DDP img/s | DDP / plain |")
    print("|---|---|---:|---:|---:|---:|")
    try:
        for name, batch, overrides in (CUDA_CASES if cuda else CPU_CASES):
            for mode, amp, compile_ in modes:
                torch.manual_seed(0)
                plain = vitlab.create_model(name, **overrides).to(device)
                ddp = parallelize(copy.deepcopy(plain), device, "ddp", compile=False)
                a = plain.vitlab_args
                x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"], device=device)
                y = torch.randint(a["num_classes"], (batch,), device=device)
                fns = {"plain": step_fn(plain, device, amp, compile_), "ddp": step_fn(ddp, device, amp, compile_)}
                for fn in fns.values():
                    measure(fn, x, y, 3 if compile_ else 1, device)
                rates = {"plain": [], "ddp": []}
                for r in range(rounds):
                    for key in (("plain", "ddp") if r % 2 == 0 else ("ddp", "plain")):
                        rates[key].append(measure(fns[key], x, y, steps, device))
                a_, b_ = statistics.median(rates["plain"]), statistics.median(rates["ddp"])
                print(f"| {name} | {mode} | {batch} | {a_:,.1f} | {b_:,.1f} | {b_ / a_:.3f} |", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
