"""Measure the runs of `make gdt` (uniform ViTs, GDT-ViT, a random tree and the content quadtree on
MNIST-on-canvas) and write the table, figures and report.

    python bench/gdt.py output/gdt_canvas [--reps 20]

For every finished run under the folder: test top-1 (classification) or mIoU and Dice (segmentation) from its
results.json; downstream tokens; FLOPs per image with `torch.utils.flop_counter` (multiply-adds), the GDT
stage encoders that choose the tree counted apart (`gflops_tree`); eval wall-clock per image at batch 64
(median of `--reps`, tokenization included). Writes gdt.md / gdt.csv, figures (quality against tokens and
against FLOPs; leaves over sample images) and report.html into the folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from resvit import fmt, gflops_per_image, ms_per_image, quiet_allocator, write_outputs  # noqa: E402  (bench/ is the script's directory)
from vitlab.data import build_data  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.plots.quadtree import leaves_figure  # noqa: E402
from vitlab.plots.routing import accuracy_flops_figure  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402

COLUMNS = ["run", "arm", "task", "tokens", "top1", "miou", "dice", "gflops", "gflops_tree", "ms_per_image"]


def arm(model) -> str:
    """uniform p=P, or GDT | random tree | content quadtree (its cell sizes) with its leaf positions."""
    tokenizer = model.tokenizer
    if tokenizer.fixed_layout:
        return f"uniform p={tokenizer.patch_size}"
    if hasattr(tokenizer, "stages"):
        kind = "random tree" if tokenizer.stages[0].scorer == "random" else "GDT"
        return f"{kind} ({model.leaf_positions.kind})"
    sizes = tokenizer.sizes
    return f"content quadtree {sizes[0]}-{sizes[-1]} px ({model.leaf_positions.kind})"


def tokens(model) -> int:
    return model.tokenizer.num_tokens


def tree_gflops(model, image: torch.Tensor) -> float:
    """GMACs of choosing the tree (GDT's stage encoders) for one image; 0 for the others."""
    if not hasattr(model, "grow"):
        return 0.0
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.grow(image[None])
    return counter.get_total_flops() / 2e9


def measure(run, batch: torch.Tensor, reps: int) -> tuple[dict, object]:
    model, _, _ = load_checkpoint(run.path / "checkpoints" / "last")
    model.eval()
    r = run.results
    task = "segment" if "test_miou" in r else "classify"
    row = {"run": f"{run.path.parent.name}/{run.path.name}", "arm": arm(model), "task": task,
           "tokens": tokens(model), "top1": r["test_top1"], "miou": r.get("test_miou", ""),
           "dice": r.get("test_dice", ""), "gflops": gflops_per_image(model, batch[:8]),
           "gflops_tree": tree_gflops(model, batch[0]), "ms_per_image": ms_per_image(model, batch, reps)}
    return row, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    quiet_allocator()
    runs = sorted(find_runs([a.root], finished_only=True), key=lambda r: str(r.path))
    if not runs:
        raise SystemExit(f"no finished runs under {a.root}; run `make gdt` first")
    rows, figures, batches = [], {}, {}
    for run in runs:
        model, cfg, _ = load_checkpoint(run.path / "checkpoints" / "last")
        key = (cfg.data.dataset, model.vitlab_args["img_size"])
        if key not in batches:  # the first 64 test images of each dataset
            data = build_data(cfg.data, img_size=key[1], in_chans=model.vitlab_args["in_chans"])
            batches[key] = next(iter(data.loader("test", 64)))
        x, y = batches[key]
        row, model = measure(run, x, a.reps)
        rows.append(row)
        print(" ".join(f"{k}={fmt(row.get(k, ''))}" for k in COLUMNS), flush=True)
        if not row["arm"].startswith("uniform"):  # where the tree put the tokens
            with torch.inference_mode():
                shown = x[:4]
                boxes = model.tokenize(shown).boxes
                preds = model(shown).argmax(1) if row["task"] == "segment" else None
            figures[f"leaves_{row['run'].replace('/', '_')}"] = leaves_figure(
                shown, boxes, f"{row['run']}: {row['arm']}, {row['tokens']} tokens",
                y[:4] if preds is not None else None, preds, model.num_classes)
    for task, quality in (("classify", "top1"), ("segment", "miou")):
        points = [{**r, "group": "uniform" if r["arm"].startswith("uniform") else r["arm"]}
                  for r in rows if r["task"] == task]
        if points:
            figures[f"{task}_vs_tokens"] = accuracy_flops_figure(
                points, f"{task}: {quality} against tokens", "tokens", quality, "downstream tokens", quality)
            figures[f"{task}_vs_flops"] = accuracy_flops_figure(
                points, f"{task}: {quality} against FLOPs", "gflops", quality, ylabel=quality)
    write_outputs(a.root, "gdt", runs, rows, COLUMNS, figures, "GDT-ViT and quadtree tokens on MNIST-on-canvas")


if __name__ == "__main__":
    main()
