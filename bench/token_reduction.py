"""Fewer tokens without retraining: token merging (ToMe) and per-image quadtree budgets applied to trained runs,
accuracy against measured throughput, with the Pareto front.

    python bench/token_reduction.py output/budgets [--merge 2 4 8] [--thresholds 5 20 80] [--images 10000]

For every finished classification run under the folder, the model as trained is one point. Then come the
training-free variants of it:
- `merge=r` (ToMe, r tokens per block, proportional attention) on any model whose blocks are the plain stack;
- `threshold=S` for content-quadtree models: the same weights, but each image gets the leaves its detail
  needs, up to the trained budget.

Each point has test top-1 on the first `--images` test images and the mean tokens entering the blocks (for
ToMe: the mean over blocks). Throughput is eval images/s at batch 64. The variants of a run are timed in
alternating rounds with the run itself, and each speed-up is the median of its per-round ratios, so a slow
spell of a shared machine cancels out. Writes token_reduction.md / .csv and plots/ (top-1 against img/s, with
the front of points no other beats in both) into the folder.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitlab.data import build_data  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.layers.token_merge import merge_schedule  # noqa: E402
from vitlab.layers.tokenizer import TokenGroups  # noqa: E402
from vitlab.names import csv_cell, printable  # noqa: E402
from vitlab.plots.common import new_figure, plot_text, save  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402

COLUMNS = ["run", "variant", "tokens", "top1", "img_per_s", "speedup"]


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
    hits, tokens, seen = 0, 0.0, []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0] * i[0].shape[1]))
             for b in model.blocks]
    for x, y in zip(images.split(256), labels.split(256)):
        hits += (model(x).argmax(-1) == y).sum().item()
        t = model.tokenize(x)
        counts = t.counts.float() if isinstance(t, TokenGroups) else torch.full((len(x),), t.tokens.shape[1] * 1.0)
        tokens += counts.sum().item()
    for h in hooks:
        h.remove()
    per_block = sum(seen) / len(images) / len(model.blocks) - model.num_prefix_tokens
    merged = any(getattr(model, "merge", [0]))
    return hits / len(labels), per_block if merged else tokens / len(images)


@torch.inference_mode()
def seconds(model, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch)
    return time.perf_counter() - start


def measure_run(run, model, images, labels, merges, thresholds, rounds: int) -> list[dict]:
    rows = []
    arms = variants(model, merges, thresholds)
    for name, change in arms:
        old = apply(model, change)
        top1, tokens = top1_and_tokens(model, images, labels)
        apply(model, old)
        rows.append({"run": str(run.path.name), "variant": name, "tokens": tokens, "top1": top1})
    batch = images[:64]
    times = {name: [] for name, _ in arms}
    for _ in range(rounds + 1):  # the first round warms up
        for name, change in arms:
            old = apply(model, change)
            times[name].append(seconds(model, batch))
            apply(model, old)
    base = times["as trained"][1:]
    for row, (name, _) in zip(rows, arms):
        mine = times[name][1:]
        row["img_per_s"] = len(batch) / statistics.median(mine)
        row["speedup"] = statistics.median(b / m for b, m in zip(base, mine))
    return rows


def front(points: list[dict]) -> list[dict]:
    """Points that no other point beats in both top-1 and img/s, fastest first."""
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (-p["img_per_s"], -p["top1"])):
        if p["top1"] > best:
            out.append(p)
            best = p["top1"]
    return out


def figure(rows: list[dict]):
    fig, ax = new_figure("top-1 against measured throughput (training-free token reduction)",
                         "eval images / s (batch 64)", "test top-1")
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        ax.plot([r["img_per_s"] for r in mine], [r["top1"] for r in mine], "o", alpha=0.8, label=plot_text(run))
        for r in mine:
            ax.annotate(plot_text(r["variant"]), (r["img_per_s"], r["top1"]), fontsize=6)
    pareto = front(rows)
    ax.plot([p["img_per_s"] for p in pareto], [p["top1"] for p in pareto], "k--", lw=0.8, label="Pareto front")
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--merge", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[5.0, 20.0, 80.0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    runs = sorted(find_runs([a.root], finished_only=True), key=lambda r: str(r.path))
    rows, tests = [], {}
    for run in runs:
        model, cfg, _ = load_checkpoint(run.path / "checkpoints" / "last")
        if model.readout.__class__.__name__ != "ClassifierHead":
            continue
        key = (cfg.data.dataset, model.vitlab_args["img_size"])
        if key not in tests:
            data = build_data(cfg.data, img_size=key[1], in_chans=model.vitlab_args["in_chans"])
            xs, ys = zip(*data.loader("test", 512))
            tests[key] = torch.cat(xs)[:a.images], torch.cat(ys)[:a.images]
        for row in measure_run(run, model.eval(), *tests[key], a.merge, a.thresholds, a.rounds):
            rows.append(row)
            print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in COLUMNS),
                  flush=True)
    if not rows:
        raise SystemExit(f"no finished classification runs under {a.root}")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else printable(str(r[c])).replace("|", "\\|")
                             for c in COLUMNS) + " |" for r in rows]
    pareto = {(p["run"], p["variant"]) for p in front(rows)}
    md.append("")
    md.append("Pareto front: " + ", ".join(f"{r} {v}" for r, v in sorted(pareto)))
    (a.root / "token_reduction.md").write_text("\n".join(md) + "\n")
    with open(a.root / "token_reduction.csv", "w", newline="") as f:  # run names are folder names: escaped
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([csv_cell(r[c]) for c in COLUMNS] for r in rows)
    save({"token_reduction": figure(rows)}, a.root / "plots")
    print(f"wrote {a.root / 'token_reduction.md'}")


if __name__ == "__main__":
    main()
