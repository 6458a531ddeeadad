"""Every GPU number in one command (`make bench-gpu`), written as a dated section of bench/RESULTS.md.

    python bench/gpu.py                      # one CUDA GPU, about 8 minutes on an H100
    python bench/gpu.py --smoke --device cpu --results /tmp/r.md   # the same pipeline, tiny, on CPU (tests)

Parts, each a table in the section (the per-topic scripts can also run alone):
1. training throughput vs timm, ViT-S/16, ViT-B/16, ViT-L/16 at 224 px, bf16 autocast, eager and compiled
   (bench/throughput.py);
2. MFU of ViT-B/16 compiled: a training step's FLOPs from torch's flop counter over its measured time, against
   the dense bf16 peak (--peak-tflops, 989 for an H100 SXM) and against a bf16 matmul ceiling measured here;
3. DDP at world size 1 against the plain module (bench/ddp_overhead.py);
4. differential vs classic attention, seed 002's 10M pair at patch 8 and 16 (bench/diff_attention.py);
5. reversible / BDIA / momentum ViT: peak allocated memory and step time by depth, 6 to 48 (bench/memory.py);
6. routed and adaptive inference: Res-ViT `skip` (top-k at ratio 0.5) against its ViT at ViT-B/16, and the
   content quadtree (cells 16-8 px, 52 tokens) against the uniform patch-4 ViT (256 tokens) on a 64 px canvas,
   bf16 eval.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
import vitlab  # noqa: E402
import vitlab.stats  # noqa: E402,F401  (registers the FLOP formula of CPU's fused attention kernel)

TABLES = [  # (title, script, full arguments, smoke arguments)
    ("Training throughput vs timm", "throughput.py",
     ["--models", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "--rounds", "5",
      "--steps", "10"],
     ["--models", "vit_micro_patch7_28", "--rounds", "1", "--steps", "1"]),
    ("DDP at world size 1", "ddp_overhead.py", [], ["--rounds", "1", "--steps", "1"]),
    ("Differential vs classic attention", "diff_attention.py", [],
     ["--patches", "16", "--rounds", "1", "--steps", "1"]),
    ("Memory-saving ViTs by depth", "memory.py", ["--depths", "6", "12", "24", "48", "--width", "384",
                                                  "--batch", "64"],
     ["--depths", "2", "4", "--width", "32", "--batch", "4", "--steps", "1"]),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, n: int, reps: int) -> float:
    """bf16 (CUDA) / fp32 (CPU) dense matmul FLOP/s on n x n operands: the ceiling MFU is also stated against."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, reps)


def mfu(name: str, batch: int, device: torch.device, peak: float, ceiling: float, reps: int,
        compile_: bool) -> str:
    """One table row: a compiled bf16 training step's counted FLOPs over its measured time."""
    torch.manual_seed(0)
    model = vitlab.create_model(name).to(device)
    a = model.vitlab_args
    x = torch.randn(batch, a["in_chans"], a["img_size"], a["img_size"], device=device)
    y = torch.randint(a["num_classes"], (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    def step():
        with amp():
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward_backward():  # what the flop counter sees (eager: it counts aten ops)
        with amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    flops = counter.get_total_flops()
    seconds = timed(step, device, reps)
    achieved = flops / seconds
    return (f"| {name} | {'compiled' if compile_ else 'eager'} | {batch} | {flops / 1e12:.3f} | "
            f"{seconds * 1e3:.1f} | {achieved / 1e12:.1f} | {100 * achieved / peak:.1f}% | "
            f"{100 * achieved / ceiling:.1f}% |")


def eval_speedup(label: str, base, fast, x: torch.Tensor, device: torch.device, reps: int) -> str:
    """One table row: eval ms per image of a baseline and a routed/adaptive model, bf16 on CUDA."""
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    def run(model):
        with torch.inference_mode(), amp():
            model(x)
    t_base, t_fast = (timed(lambda m=m: run(m), device, reps) for m in (base.eval(), fast.eval()))
    per = 1e3 / x.shape[0]
    return f"| {label} | {x.shape[0]} | {t_base * per:.3f} | {t_fast * per:.3f} | {t_base / t_fast:.2f}x |"


def routed_rows(device: torch.device, smoke: bool, reps: int) -> list[str]:
    torch.manual_seed(0)
    size = ({"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 32, "patch_size": 8} if smoke else {})
    vit = vitlab.create_model("vit_base_patch16_224", **size).to(device)
    resvit = vitlab.create_model("resvit_base_patch16_224", **size, execution="skip", eval_routing="topk",
                                 active_target=0.5, router_hdim=64, low_rank_dim=32).to(device)
    resvit.load_state_dict(vit.state_dict(), strict=False)
    batch = 4 if smoke else 64
    a = vit.vitlab_args
    x = torch.randn(batch, 3, a["img_size"], a["img_size"], device=device)
    rows = [eval_speedup(f"Res-ViT `skip`, ratio 0.5 vs ViT ({'tiny' if smoke else 'ViT-B/16'})", vit, resvit, x,
                         device, reps)]
    canvas = {"img_size": 64, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 4, "num_heads": 4,
              "global_pool": "avg"}
    uniform = vitlab.create_model("vit_micro_patch4_32", **canvas).to(device)
    quadtree = vitlab.create_model("vit_micro_patch4_32", **{**canvas, "patch_size": 8}, tokenizer="quadtree",
                                   tokens=52, quadtree_sizes=[16, 8], leaf_pos="seq").to(device)  # make gdt's best
    x = torch.zeros(8 if smoke else 256, 1, 64, 64, device=device)
    x[:, :, 20:44, 20:44] = torch.rand(x.shape[0], 1, 24, 24, device=device)  # a digit-sized patch of detail
    rows.append(eval_speedup("content quadtree 16-8 px, 52 tokens vs patch 4, 256 tokens (64 px canvas)", uniform,
                             quadtree, x, device, reps))
    return rows


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", type=Path, default=BENCH / "RESULTS.md", help="the file the section is added to")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: checks the pipeline")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (use --device cpu --smoke to check the pipeline)")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    reps = 1 if args.smoke else 20
    started = time.perf_counter()
    parts = [f"## GPU benchmarks ({datetime.date.today()}, {where}, torch {torch.__version__}, "
             f"commit {git_commit()}{', smoke run' if args.smoke else ''})\n"]
    for title, script, full, smoke in TABLES:
        out = subprocess.run([sys.executable, str(BENCH / script), "--device", args.device,
                              *(smoke if args.smoke else full)], capture_output=True, text=True)
        body = out.stdout.strip() if out.returncode == 0 else f"failed (exit {out.returncode}):\n\n    " + \
            "\n    ".join(out.stderr.strip().splitlines()[-5:])
        parts.append(f"### {title}\n\n{body}\n")
        print(parts[-1], flush=True)
    ceiling = matmul_ceiling(device, 1024 if args.smoke else 8192, reps)
    peak = args.peak_tflops * 1e12
    cases = [("vit_micro_patch7_28", 8)] if args.smoke else [("vit_base_patch16_224", 128)]
    rows = [mfu(name, batch, device, peak, ceiling, reps, compile_) for name, batch in cases
            for compile_ in ((False,) if args.smoke else (False, True))]
    parts.append(f"### MFU\n\nmatmul ceiling measured here: {ceiling / 1e12:.1f} TFLOP/s; peak "
                 f"{args.peak_tflops:g} TFLOP/s.\n\n| model | mode | batch | TFLOP / step | ms / step | TFLOP/s | MFU "
                 f"(peak) | vs matmul ceiling |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    print(parts[-1], flush=True)
    parts.append("### Routed and adaptive inference (eval, ms per image)\n\n| pair | batch | baseline | "
                 "routed / adaptive | speed-up |\n|---|---:|---:|---:|---:|\n"
                 + "\n".join(routed_rows(device, args.smoke, reps)) + "\n")
    print(parts[-1], flush=True)
    parts.append(f"Total time: {time.perf_counter() - started:.0f} s.\n")
    with open(args.results, "a") as f:
        f.write("\n" + "\n".join(parts))
    print(f"section added to {args.results}")


if __name__ == "__main__":
    main()
