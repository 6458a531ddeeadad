"""Accuracy against speed for every way of spending fewer tokens: trained runs (uniform ViTs, depth cuts,
Res-ViT, content / per-image / learned / random trees) and training-free variants of them (ToMe, per-image
thresholds), in one table and one picture with the Pareto front.

    python bench/token_reduction.py output/pareto [--merge 2 4 8] [--thresholds 5 20 80] [--images 10000]
                                    [--wide 384x6] [--reference uniform_p8]

For every finished classification run under the folder, the model as trained is one point. Then come the
training-free variants of it:
- `merge=r` (ToMe, r tokens per block, proportional attention) on any model whose blocks are the plain stack;
- `threshold=S` for content-quadtree models: the same weights, but each image gets the leaves its detail
  needs, up to the trained budget.

Each point has test top-1 on the first `--images` test images, the mean tokens entering the blocks' MLPs (over
blocks and images, prefix tokens excluded: what ToMe, routing and per-image budgets save), and GMACs per image
counted on a test batch with attention on torch's math kernel (so its matmuls are counted). Throughput is eval
at batch 64: in every round each point is timed right after the reference run (as trained), and its speed-up is
the median over rounds of the reference's time over its own (the order of points reversed every other round),
so a slow spell of a shared machine cancels out; img/s is the reference's median img/s times that speed-up. `--wide DxH` also times each point's architecture at width D
with H heads (ViT-S: 384x6) from random weights: the leaves, ToMe's r and the routers' capacity fix the token
counts, so the compute is that of trained weights. Writes token_reduction.md / .csv and plots/ (top-1 against
img/s, against GMACs and, with --wide, against img/s at that width; each with its front of points no other
beats in both) into the folder.
"""
from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402
from vitlab.data import build_data  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.layers.token_merge import merge_schedule  # noqa: E402
from vitlab.names import atomic_write, csv_cell, printable  # noqa: E402
from vitlab.plots.common import new_figure, plot_text, save  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402

COLUMNS = ["run", "variant", "tokens", "gmacs", "top1", "img_per_s", "speedup"]
WIDE = ["img_per_s_wide", "speedup_wide"]


def variants(model, merges: list[int], thresholds: list[float]) -> list[tuple[str, dict]]:
    """(name, attribute changes) of every training-free variant that applies to `model`, the model first."""
    out = [("as trained", {})]
    if getattr(model, "merges_tokens", False) and not any(model.merge):
        out += [(f"merge={r}", {"merge": merge_schedule(r, len(model.blocks))}) for r in merges]
    tokenizer = model.tokenizer
    if hasattr(tokenizer, "threshold") and tokenizer.threshold is None:
        out += [(f"threshold={s:g}", {"threshold": s}) for s in thresholds]
    return out


def apply(model, change: dict) -> dict:
    """Set the variant's attributes (on the model, or on its tokenizer for `threshold`); returns the old values."""
    old = {}
    for key, value in change.items():
        owner = model.tokenizer if key == "threshold" else model
        old[key] = getattr(owner, key)
        setattr(owner, key, value)
    return old


@torch.inference_mode()
def top1_and_tokens(model, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1, and the tokens entering the blocks' MLPs per image, mean over blocks (prefix tokens excluded)."""
    hits, seen = 0, []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0] * i[0].shape[1]))
             for b in model.blocks]
    for x, y in zip(images.split(256), labels.split(256)):
        hits += (model(x).argmax(-1) == y).sum().item()
    for h in hooks:
        h.remove()
    return hits / len(labels), sum(seen) / len(images) / len(model.blocks) - model.num_prefix_tokens


@torch.inference_mode()
def gmacs(model, batch: torch.Tensor) -> float:
    """FLOPs / 2 (multiply-accumulates, as `vitlab.stats`) per image of `batch`, SDPA on the math kernel."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(batch)
    return counter.get_total_flops() / 2e9 / len(batch)


@torch.inference_mode()
def seconds(model, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch)
    return time.perf_counter() - start


def points_of(run, model, images, labels, merges, thresholds) -> list[dict]:
    """Every variant of a run with its top-1, tokens and GFLOPs; `model` and `change` kept for timing."""
    rows = []
    for name, change in variants(model, merges, thresholds):
        old = apply(model, change)
        torch.manual_seed(0)  # a random tree draws at inference: the same draws for every call of the bench
        top1, tokens = top1_and_tokens(model, images, labels)
        macs = gmacs(model, images[:64])
        apply(model, old)
        rows.append({"run": str(run.path.name), "variant": name, "tokens": tokens, "gmacs": macs, "top1": top1,
                     "model": model, "change": change})
    return rows


def time_points(points: list[dict], models: list, batch: torch.Tensor, rounds: int,
                reference: int) -> tuple[list[float], list[float]]:
    """(img/s, speed-up against points[reference]) of each point's model with its change. In each of `rounds`
    rounds (after a warm-up round) every point runs right after the reference, and its speed-up is the median
    of the reference's time over its own; img/s is the reference's median img/s times the speed-up."""
    def run(i: int) -> float:
        old = apply(models[i], points[i]["change"])
        t = seconds(models[i], batch)
        apply(models[i], old)
        return t

    ratios, base = [[] for _ in points], []
    order = list(range(len(points)))
    for r in range(rounds + 1):
        for i in (order if r % 2 == 0 else order[::-1]):
            t_ref, t = run(reference), run(i)
            if r:  # the first round warms up
                base.append(t_ref)
                ratios[i].append(t_ref / t)
    speedups = [statistics.median(x) for x in ratios]
    reference_rate = len(batch) / statistics.median(base)
    return [reference_rate * x for x in speedups], speedups


def widened(model, width: int, heads: int):
    """The same architecture at `width` with `heads` heads, random weights, eval mode (one per run)."""
    torch.manual_seed(0)
    return vitlab.create_model(model.vitlab_name, **{**model.vitlab_args, "embed_dim": width,
                                                     "num_heads": heads}).eval()


def front(points: list[dict], x: str = "img_per_s", faster: bool = True) -> list[dict]:
    """Points that no other point beats in both top-1 and `x` (higher is better if `faster`, else lower),
    best `x` first."""
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (-p[x] if faster else p[x], -p["top1"])):
        if p["top1"] > best:
            out.append(p)
            best = p["top1"]
    return out


def figure(rows: list[dict], x: str, title: str, xlabel: str):
    fig, ax = new_figure(title, xlabel, "test top-1")
    colours = matplotlib.colormaps["tab20"]
    for i, run in enumerate(sorted({r["run"] for r in rows})):
        mine = [r for r in rows if r["run"] == run]
        ax.plot([r[x] for r in mine], [r["top1"] for r in mine], "os^D"[i // 20 % 4], color=colours(i % 20),
                alpha=0.85, label=plot_text(run))
        for r in mine:
            if r["variant"] != "as trained":
                ax.annotate(plot_text(r["variant"]), (r[x], r["top1"]), fontsize=6)
    pareto = front(rows, x, faster=x != "gmacs")
    ax.plot([p[x] for p in pareto], [p["top1"] for p in pareto], "k--", lw=0.8, label="Pareto front")
    ax.legend(fontsize=6, ncol=2)
    return fig


def figures(rows: list[dict], wide: str | None) -> dict:
    out = {"token_reduction": figure(rows, "img_per_s", "top-1 against measured throughput",
                                     "eval images / s (batch 64)"),
           "token_reduction_flops": figure(rows, "gmacs", "top-1 against compute", "GMACs / image")}
    if wide:
        out["token_reduction_wide"] = figure(rows, "img_per_s_wide", f"top-1 against throughput at {wide}",
                                             f"eval images / s at {wide} (batch 64, random weights)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--merge", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[5.0, 20.0, 80.0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--wide", default=None, help="also time every point at this width x heads (ViT-S: 384x6)")
    ap.add_argument("--reference", default=None, help="the run the speed-ups are against (default: the first)")
    ap.add_argument("--replot", action="store_true", help="redraw the figures from token_reduction.csv only")
    a = ap.parse_args()
    if a.wide and not re.fullmatch(r"[1-9]\d*x[1-9]\d*", a.wide):
        ap.error(f"--wide {a.wide!r}: give width x heads, e.g. 384x6")
    if a.replot:
        with open(a.root / "token_reduction.csv", newline="") as f:  # csv_cell's quote before a formula-like name
            rows = [{k: (v.removeprefix("'") if k in ("run", "variant") else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(f)]
        wide = re.search(r"the same architectures at (\d+x\d+)", (a.root / "token_reduction.md").read_text())
        return save(figures(rows, wide and "img_per_s_wide" in rows[0] and wide.group(1)), a.root / "plots")
    runs = sorted(find_runs([a.root], finished_only=True), key=lambda r: str(r.path))
    rows, tests, wide = [], {}, {}
    for run in runs:
        model, cfg, _ = load_checkpoint(run.path / "checkpoints" / "last")
        if model.readout.__class__.__name__ != "ClassifierHead":
            continue
        key = (cfg.data.dataset, cfg.data.data_dir, cfg.data.split_seed, cfg.data.test_fraction,
               model.vitlab_args["img_size"], cfg.data.canvas_size, cfg.data.canvas_digit_size,
               cfg.data.canvas_clutter)
        if key not in tests:
            data = build_data(cfg.data, img_size=key[4], in_chans=model.vitlab_args["in_chans"])
            xs, ys = zip(*data.loader("test", 512))
            tests[key] = torch.cat(xs)[:a.images], torch.cat(ys)[:a.images]
        for row in points_of(run, model.eval(), *tests[key], a.merge, a.thresholds):
            row["test"] = key
            rows.append(row)
            print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                           for k in COLUMNS[:5]), flush=True)
        if a.wide:
            width, heads = (int(v) for v in a.wide.split("x"))
            wide[id(model)] = widened(model, width, heads)
    if not rows:
        raise SystemExit(f"no finished classification runs under {a.root}")
    if len({r["test"] for r in rows}) > 1:
        raise SystemExit(f"the runs under {a.root} are on different test sets; time them apart")
    names = [r["run"] for r in rows]
    if a.reference is not None and a.reference not in names:
        raise SystemExit(f"--reference {a.reference}: no finished classification run of that name under {a.root}")
    ref = names.index(a.reference) if a.reference else 0
    batch = tests[rows[0]["test"]][0][:64]
    columns = COLUMNS + (WIDE if a.wide else [])
    speeds = time_points(rows, [r["model"] for r in rows], batch, a.rounds, ref)
    if a.wide:
        speeds += time_points(rows, [wide[id(r["model"])] for r in rows], batch, a.rounds, ref)
    for i, row in enumerate(rows):
        for column, values in zip(columns[5:], speeds):
            row[column] = values[i]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else printable(str(v)).replace("|", "\\|")  # noqa: E731
    md = [f"Speed-ups against {cell(rows[ref]['run'])} as trained; {torch.get_num_threads()} threads, batch 64, "
          f"median of {a.rounds} rounds, each point timed right after the reference" + (f"; _wide: the same architectures at {a.wide} (width x heads)"
                                               if a.wide else ""), "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    md.append("")
    for x in ["img_per_s", "gmacs"] + (["img_per_s_wide"] if a.wide else []):
        md.append(f"Pareto front (top-1 against {x}): "
                  + ", ".join(f"{cell(p['run'])} {p['variant']}" for p in front(rows, x, faster=x != "gmacs")))
    atomic_write(a.root / "token_reduction.md", "\n".join(md) + "\n")
    with open(a.root / "token_reduction.csv", "w", newline="") as f:  # run names are folder names: escaped
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([csv_cell(r[c]) for c in columns] for r in rows)
    save(figures(rows, a.wide), a.root / "plots")
    print("\n".join(md))
    print(f"wrote {a.root / 'token_reduction.md'}")


if __name__ == "__main__":
    main()
