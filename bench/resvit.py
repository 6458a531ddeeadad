"""Measure the runs of `make resvit` (Res-ViT on MNIST-on-canvas) and write the table, figures and report.

    python bench/resvit.py output/resvit_canvas [--images 1024] [--reps 20]
    python bench/resvit.py [--wide small_patch16_224] [--wide-reps 8] [--compile]     # the reference width alone

For every finished run under the folder (the teacher, the routing sweep, the depth cuts, the seeds):
LoRA merged into the weights (how it is deployed): test top-1 on all 10,000 test images (Res-ViT: in `skip` with
the run's inference decisions, top-k at the target by default; `top1_threshold` with the original's p > 1/2;
`top1_mod` under `mod`); on the first `--images` test images: the measured active ratio of the dynamic layers
(patch tokens) and the fraction of kept tokens that touch the digit against the fraction of all tokens that do;
FLOPs per image measured with `torch.utils.flop_counter` in `skip` (one image at a time, so no padding is
counted; multiply-adds, the GFLOPs convention) and `dyn_flops`, the dynamic layers' (routers and approximators
included) against as many of the teacher's layers; eval wall-clock per image at batch 64 (median of `--reps`) in
`mask`, `skip` and `mod`, and the speed-up of `skip` over the teacher measured in the same process; then Res-ViT
against the plain ViT at a reference width (`--wide`, interleaved). Writes resvit.md / resvit.csv, figures
(accuracy vs FLOPs, kept tokens over sample images) and report.html into the folder.
"""
from __future__ import annotations

import argparse
import ctypes
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab.stats  # noqa: E402,F401  (FLOP formulas for CPU attention)
from vitlab import create_model  # noqa: E402
from vitlab.data import build_data  # noqa: E402
from vitlab.experiments.report import build_report, html_table  # noqa: E402
from vitlab.layers.lora import merge_lora  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.plots import all_run_figures  # noqa: E402
from vitlab.plots.common import save  # noqa: E402
from vitlab.plots.routing import accuracy_flops_figure, routing_figure  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402


def quiet_allocator() -> None:
    """Keep freed memory in the heap (glibc): without it every large activation is a fresh mmap whose page
    faults add seconds of system time and most of the run-to-run noise, for both models alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option in (-1, -3):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        libc.mallopt(option, 1 << 30)


def gflops_per_image(model, images: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        for x in images:
            model(x[None])
    return counter.get_total_flops() / len(images) / 2e9


def ms_per_image(model, x: torch.Tensor, reps: int) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times) / len(x)


def touches_digit(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, grid^2) bool: the patch holds a pixel brighter than the black canvas."""
    background = images.amin()
    return (F.max_pool2d(images[:, :1], patch) > background + 1e-3).flatten(1)


def is_resvit(run) -> bool:
    return str(run.results.get("architecture", "")).endswith("resvit")  # also diff_resvit


def describe(run, args: dict) -> tuple[str, str]:
    """(arm, group) labels of a run from its model arguments and config."""
    lora = "LoRA" if run.config.get("lora", {}).get("rank") else "full FT"
    if not is_resvit(run):
        depth = args.get("depth")
        return (f"ViT depth {depth}", "teacher" if run.path.name == "teacher" else f"depth cut, {lora}")
    arm = ("random" if args.get("routing") == "random"
           else f"learned ({args.get('router_grad')}, {args.get('train_routing', 'sample')})")
    return arm, f"{arm}, {lora}"


def top1(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return sum((model(x).argmax(-1) == y).sum().item() for x, y in
                   zip(images.split(256), labels.split(256))) / len(labels)


def reference_width(size: str, batch: int, reps: int, compiled: bool = False) -> list[dict]:
    """Eval wall-clock per image of Res-ViT at ratio 0.5 (`skip` and `mod`) against the plain ViT at a reference
    size, measured interleaved in one process; with `compiled`, every arm is torch.compile'd (inductor's C++
    kernels on CPU) and checked against its eager output first. Untrained weights: top-k decisions keep exactly
    half of the patch tokens whatever the router says, so the time does not depend on them. The router and
    approximator are scaled as in the canvas recipe (router D/8 wide, approximator rank D/16)."""
    torch.manual_seed(0)
    vit = create_model(f"vit_{size}").eval()
    dim = vit.embed_dim
    routed = dict(active_target=0.5, router_hdim=dim // 8, low_rank_dim=dim // 16)
    skip = create_model(f"resvit_{size}", execution="skip", **routed).eval()
    mod = create_model(f"resvit_{size}", execution="mod", **routed).eval()
    mod.load_state_dict(skip.state_dict())
    x = torch.randn(batch, 3, vit.patch_embed.img_size, vit.patch_embed.img_size)
    arms = {"vit": vit, "skip": skip, "mod": mod}
    runs = {arm: torch.compile(model) if compiled else model for arm, model in arms.items()}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    with torch.inference_mode():
        if compiled:  # compiles each arm, and holds it to its eager output
            for arm, model in arms.items():
                torch.testing.assert_close(runs[arm](x), model(x), atol=1e-3, rtol=1e-3)
        for rep in range(reps + 1):  # the first round warms up
            for arm, run in runs.items():
                t = time.perf_counter()
                run(x)
                if rep:
                    times[arm].append(time.perf_counter() - t)
    return [{"model": model.vitlab_name + ("" if arm == "vit" else f" ({arm})"),
             "compiled": compiled, "batch": batch, "ms_per_image": 1e3 * statistics.median(times[arm]) / batch,
             "gflops": gflops_per_image(model, x[:1]),
             # the median of each round's ratio: a slow spell of the machine slows both arms of a round
             "speedup": statistics.median(v / t for v, t in zip(times["vit"], times[arm]))}
            for arm, model in arms.items()]


def print_wide(size: str, reps: int, compiled: bool) -> list[str]:
    """Time `reference_width` at batch 64, eager and (with `compiled`) compiled; print the table and return its
    lines."""
    wide = reference_width(size, 64, reps) + (reference_width(size, 64, reps, compiled=True) if compiled else [])
    keys = list(wide[0])
    notes = ["", f"At a reference width (batch 64, {reps} interleaved rounds, untrained weights, ratio 0.5; ms: "
                 "median; speedup: median of the rounds' ratios):", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    notes += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in wide]
    print("\n".join(notes), flush=True)
    return notes


def block_flops(model, image: torch.Tensor) -> tuple[float, float]:
    """(GMACs of one block, GMACs of everything else: embedding, final norm, head) per image."""
    tokens = model.embed(image[None])
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.blocks[0](tokens)
    block = counter.get_total_flops() / 2e9
    return block, gflops_per_image(model, image[None]) - len(model.blocks) * block


def measure(run, test: tuple[torch.Tensor, torch.Tensor], n: int, reps: int,
            unit: tuple[float, float]) -> tuple[dict, object]:
    model, _, _ = load_checkpoint(run.path / "checkpoints" / "last")  # the weights results.json tested
    merge_lora(model)  # deployed as merged weights: the base model's cost
    torch.manual_seed(0)  # random routing draws
    args = model.vitlab_args
    arm, group = describe(run, args)
    row = {"run": run.path.name, "arm": arm, "group": group, "target": args.get("active_target", ""),
           "lora": run.config.get("lora", {}).get("rank", 0), "seed": run.config.get("train", {}).get("seed", 0),
           "top1": run.results["test_top1"], "trainable_params": run.results.get("trainable_params",
                                                                                   run.results["params"])}
    images = test[0][:n]
    batch = images[:64]
    if not is_resvit(run):
        row.update(gflops=gflops_per_image(model, images[:32]), ms_mask=ms_per_image(model, batch, reps))
        return row, None
    patch, grid = args["patch_size"], args["img_size"] // args["patch_size"]
    model.execution, decisions = "skip", model.eval_routing
    row["top1"] = top1(model, *test)  # the run's own inference decisions (top-k at the target: the default)
    model.eval_routing = "threshold"  # the original's p > 1/2
    row["top1_threshold"] = top1(model, *test)
    model.eval_routing = decisions
    keep = torch.cat([model.route(x)[1] for x in images.split(64)])  # (n, dynamic layers, 1 + grid^2)
    patch_keep = keep[:, :, -grid * grid:]
    fg = touches_digit(images, patch)[:, None].expand_as(patch_keep)
    row.update(active=patch_keep.float().mean().item(),
               kept_on_digit=(patch_keep & fg).sum().item() / max(patch_keep.sum().item(), 1),
               tokens_on_digit=fg.float().mean().item(),
               gflops=gflops_per_image(model, images[:32]))
    # dynamic layers (routers and approximators included) against as many of the teacher's layers
    block, rest = unit
    static = args["dynamic_start_layer"]
    row["dyn_flops"] = (row["gflops"] - rest - static * block) / ((len(model.blocks) - static) * block)
    for mode in ("mask", "skip", "mod"):
        model.execution = mode
        row[f"ms_{mode}"] = ms_per_image(model, batch, reps)
    row["top1_mod"] = top1(model, *test)
    model.execution = "skip"
    return row, keep


COLUMNS = ["run", "group", "target", "seed", "top1", "top1_threshold", "top1_mod", "active", "kept_on_digit",
           "tokens_on_digit", "gflops", "dyn_flops", "ms_mask", "ms_skip", "ms_mod", "speedup_skip",
           "trainable_params"]


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, nargs="?", help="the runs of `make resvit`; without it, only --wide is timed")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--wide", default="small_patch16_224", help="reference size timed at batch 64 ('' skips it)")
    p.add_argument("--wide-reps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the reference width torch.compile'd")
    a = p.parse_args()
    quiet_allocator()
    if a.root is None:
        print_wide(a.wide, a.wide_reps, a.compile)
        return
    runs = find_runs([a.root], finished_only=True)
    teacher = next(r for r in runs if r.path.name == "teacher")
    _, cfg, _ = load_checkpoint(teacher.path)
    data = build_data(cfg.data)
    x, y = zip(*[(xb, yb) for xb, yb in data.loader("test", 256)])
    test = torch.cat(x), torch.cat(y)
    images = test[0][:a.images]
    unit = block_flops(load_checkpoint(teacher.path / "checkpoints" / "last")[0], images[0])
    rows, figures, shown = [], {}, 0
    for run in sorted(runs, key=lambda r: str(r.path)):
        row, routed = measure(run, test, a.images, a.reps, unit)
        rows.append(row)
        print(" ".join(f"{k}={fmt(row.get(k, ''))}" for k in COLUMNS), flush=True)
        if routed is not None and row["lora"] and row["seed"] == 0 and shown < 4 and row["arm"] == "learned (ste, topk)":
            keep = routed
            raw = images[:8] * data.info.std[0] + data.info.mean[0]
            figures[f"kept_tokens_{row['run']}"] = routing_figure(
                raw, keep[:8], data.img_size // 4,
                f"{row['run']}: layers each token ran (of {keep.shape[1]}); top-1 {row['top1']:.3f}")
            shown += 1
    base_ms = next(r["ms_mask"] for r in rows if r["run"] == "teacher")
    for r in rows:
        r["speedup_skip"] = base_ms / r.get("ms_skip", r["ms_mask"])
    figures["accuracy_vs_flops"] = accuracy_flops_figure(
        [{"group": r["group"], "gflops": r["gflops"], "top1": r["top1"]} for r in rows])
    notes = print_wide(a.wide, a.wide_reps, a.compile) if a.wide else []
    write_outputs(a.root, "resvit", runs, rows, COLUMNS, figures, "Res-ViT on MNIST-on-canvas (seed 001)", notes)


def write_outputs(out: Path, stem: str, runs, rows: list[dict], columns: list[str], figures: dict, title: str,
                  notes: list[str] = ()) -> None:
    """<stem>.csv; <stem>.md (the table, then `notes`); report.html (the table, the figures and every run's
    curves); the figures as PNG and SVG under plots/."""
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    body = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(b) + " |" for b in body]
    (out / f"{stem}.md").write_text("\n".join([*md, *notes]) + "\n")
    page = build_report(runs, {**figures, **all_run_figures(runs)}, title)
    page = page.replace("<h2>Runs</h2>", f"<h2>Measured (bench/{stem}.py)</h2>" + html_table(columns, body)
                        + "<h2>Runs</h2>", 1)
    (out / "report.html").write_text(page)
    save(figures, out / "plots")
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.csv'}, {out / 'plots'}, {out / 'report.html'}")
    print(json.dumps({"runs": len(rows)}))


if __name__ == "__main__":
    main()
