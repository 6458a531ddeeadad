"""Seed 002's hypothesis, measured: is the differential ViT better on noisy data? The analysis of
`make seed002-noise` (configs/experiments/seed002_noise/), from the run directories alone.

    python bench/seed002_noise.py output/seed002_noise [--images 256] [--docs docs/experiments]

For every finished run under the folder: its noise condition (pixel noise, label noise, canvas clutter, from
its config), attention (classic, differential V1, V2), width and seed, and test top-1 from results.json. Then:

* accuracy per (condition, attention, width): the mean over seeds with a 95% t-interval;
* the paired difference differential - classic (and V2 - classic) per condition, paired by (width, seed),
  with a 95% t-interval, and the same difference minus its value on the clean data (does the gap grow with
  the noise?: the hypothesis's own prediction);
* where attention goes: each run's checkpoint on `--images` test images, the share of the read-out query's
  attention (class token, or the mean patch token for mean-pooled models) that lands on the digit's patches,
  on clutter and on background, per layer (vitlab.attention_maps); and maps side by side.

Writes noise_study.md / noise_study.csv / attention_shares.csv and plots/ into the folder (and the figures
into `--docs` when given).
"""
from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitlab.attention_maps import attention_maps, attention_shares, patch_kinds  # noqa: E402
from vitlab.data import build_data  # noqa: E402
from vitlab.data.datasets import CanvasDigits  # noqa: E402
from vitlab.data.loaders import _tensors  # noqa: E402
from vitlab.data.noise import NoisyImages  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.plots.common import save, subplots  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402

ATTENTIONS = {"mhsa": "classic", "diff": "differential", "diff2": "differential V2"}
KINDS = ["background", "digit", "clutter"]
COLOURS = {"classic": "tab:blue", "differential": "tab:orange", "differential V2": "tab:green"}


def condition(cfg: dict) -> tuple[str, str]:
    """(condition, its clean reference) from a run's flat config."""
    if cfg.get("data.dataset") == "mnist_canvas":
        clutter = int(cfg.get("data.canvas_clutter", 0) or 0)
        return (f"canvas clutter {clutter}" if clutter else "canvas clean"), "canvas clean"
    pixel, label = float(cfg.get("data.pixel_noise", 0) or 0), float(cfg.get("data.label_noise", 0) or 0)
    if pixel and label:
        return f"pixel {pixel:g} + labels {label:.0%}", "MNIST clean"
    if pixel:
        return f"pixel noise {pixel:g}", "MNIST clean"
    if label:
        return f"label noise {label:.0%}", "MNIST clean"
    return "MNIST clean", "MNIST clean"


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for fewer than two values."""
    from scipy.stats import t

    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def pm(mean: float, half: float, scale: float = 100.0) -> str:
    return f"{scale * mean:.2f} ± {scale * half:.2f}" if not math.isnan(half) else f"{scale * mean:.2f}"


def collect(root: Path) -> list[dict]:
    rows = []
    for run in find_runs([root], finished_only=True):
        cfg = run.flat_config
        attn = ATTENTIONS.get(cfg.get("model.attn_layer") or ("diff" if "diff" in run.model else "mhsa"))
        cond, ref = condition(cfg)
        rows.append({"run": run, "condition": cond, "reference": ref, "attention": attn,
                     "width": int(cfg.get("model.embed_dim") or 0), "seed": int(cfg.get("train.seed", 0)),
                     "top1": float(run.results["test_top1"])})
    return rows


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["condition"], r["attention"], r["width"])].append(r["top1"])
    out = []
    for (cond, attn, width), values in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        mean, half = interval(values)
        out.append({"condition": cond, "attention": attn, "width": width, "seeds": len(values),
                    "top1 %": pm(mean, half), "mean": mean, "ci": half})
    return ["condition", "attention", "width", "seeds", "top1 %"], out


def paired(rows: list[dict], versus: str) -> list[dict]:
    """Per condition: `versus` - classic, paired by (width, seed), and that gap minus the gap on the clean
    reference (paired by (width, seed) as well)."""
    acc = {(r["condition"], r["attention"], r["width"], r["seed"]): r["top1"] for r in rows}
    refs = {r["condition"]: r["reference"] for r in rows}
    gap = {(c, w, s): acc[(c, versus, w, s)] - acc[(c, "classic", w, s)]
           for (c, a, w, s) in acc if a == versus and (c, "classic", w, s) in acc}
    out = []
    for cond in sorted({c for c, _, _ in gap}, key=lambda c: _order((c,))):
        keys = sorted((w, s) for c, w, s in gap if c == cond)
        mean, half = interval([gap[(cond, *k)] for k in keys])
        row = {"condition": cond, "pairs": len(keys), f"{versus} - classic (points)": pm(mean, half),
               "mean": mean, "ci": half}
        widths = sorted({w for w, _ in keys})
        for w in widths:
            m, h = interval([gap[(cond, w, s)] for ww, s in keys if ww == w])
            row[f"width {w}"] = pm(m, h)
        ref = refs[cond]
        if ref != cond:
            both = [k for k in keys if (ref, *k) in gap]
            m, h = interval([gap[(cond, *k)] - gap[(ref, *k)] for k in both]) if both else (math.nan, math.nan)
            row["minus the clean gap"] = pm(m, h)
            row["growth"], row["growth_ci"] = m, h
        out.append(row)
    return out


def _order(key: tuple) -> tuple:
    cond = key[0]
    rank = 0 if cond == "MNIST clean" else 1 if cond.startswith("pixel") else 2 if cond.startswith("label") \
        else 3 if cond == "canvas clean" else 4
    return (rank, cond, *key[1:])


def ink(split, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit ink, clutter ink) of test images `index`, each (B, H, W) in [0, 1], without pixel noise."""
    images, _ = _tensors(split)
    base = images.images if isinstance(images, NoisyImages) else images
    if isinstance(base, CanvasDigits):
        digit = base.render(index, clutter=False)[:, 0].float() / 255
        full = base.render(index)[:, 0].float() / 255
        return digit, (full - digit).clamp(min=0)
    digit = base[index][:, 0].float() / 255
    return digit, torch.zeros_like(digit)


def measure_attention(rows: list[dict], images: int) -> list[dict]:
    """Per run and layer: the shares of attention on background / digit / clutter patches (and their area)."""
    out, data_cache = [], {}
    for r in rows:
        model, cfg, _ = load_checkpoint(r["run"].path / "checkpoints" / "last")
        key = repr(cfg.data)
        if key not in data_cache:
            data = build_data(cfg.data, img_size=model.vitlab_args["img_size"], in_chans=model.vitlab_args["in_chans"])
            x, _ = next(iter(data.loader("test", images)))
            digit, clutter = ink(data.splits["test"], torch.arange(len(x)))
            data_cache[key] = (x, digit, clutter)
        x, digit, clutter = data_cache[key]
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        kinds = patch_kinds(digit, clutter, patch)
        query = "cls" if model.global_pool == "token" else "mean"
        shares = attention_shares(attention_maps(model, x), kinds, len(KINDS), model.num_prefix_tokens, query)
        area = torch.nn.functional.one_hot(kinds, len(KINDS)).float().mean((0, 1))
        for layer, s in enumerate(shares.tolist()):
            out.append({"run": r["run"].path.name, "condition": r["condition"], "attention": r["attention"],
                        "width": r["width"], "seed": r["seed"], "layer": layer + 1, "query": query,
                        **{f"share {k}": v for k, v in zip(KINDS, s)},
                        **{f"area {k}": float(a) for k, a in zip(KINDS, area)}})
    return out


def figures(rows: list[dict], gaps: dict[str, list[dict]], shares: list[dict], map_runs: list[dict],
            images: int) -> dict:
    figs = {}
    # accuracy per condition and attention, means over widths and seeds with 95% intervals
    conds = sorted({r["condition"] for r in rows}, key=lambda c: _order((c,)))
    fig, ax = subplots(figsize=(max(7.0, 1.1 * len(conds)), 4.2))
    for i, attn in enumerate(ATTENTIONS.values()):
        stats = [interval([r["top1"] for r in rows if r["condition"] == c and r["attention"] == attn] or [math.nan])
                 for c in conds]
        ax.errorbar([j + (i - 1) * 0.22 for j in range(len(conds))], [100 * m for m, _ in stats],
                    yerr=[100 * (h if not math.isnan(h) else 0) for _, h in stats], fmt="o", capsize=3,
                    color=COLOURS[attn], label=attn)
    ax.set_xticks(range(len(conds)), conds, rotation=20, ha="right")
    ax.set_ylabel("test top-1 % (mean over widths and seeds, 95% CI)")
    ax.set_title("Seed 002's micro ViTs under noise")
    ax.grid(True, alpha=0.3)
    ax.legend()
    figs["noise_accuracy"] = fig
    # paired differences against classic, per condition
    fig, ax = subplots(figsize=(max(7.0, 1.1 * len(conds)), 4.2))
    for i, (versus, rows_v) in enumerate(gaps.items()):
        xs = [conds.index(g["condition"]) + (i - 0.5) * 0.25 for g in rows_v]
        ax.errorbar(xs, [100 * g["mean"] for g in rows_v],
                    yerr=[100 * (g["ci"] if not math.isnan(g["ci"]) else 0) for g in rows_v], fmt="o", capsize=3,
                    color=COLOURS[versus], label=f"{versus} - classic")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(conds)), conds, rotation=20, ha="right")
    ax.set_ylabel("paired difference, points (95% CI)")
    ax.set_title("Differential minus classic, paired by width and seed")
    ax.grid(True, alpha=0.3)
    ax.legend()
    figs["noise_paired_difference"] = fig
    # attention shares per layer on the digit (and clutter), per attention, per condition with labelled patches
    share_conds = [c for c in conds if any(s["condition"] == c for s in shares)]
    if share_conds:
        fig, axes = subplots(1, len(share_conds), figsize=(3.2 * len(share_conds), 3.6), squeeze=False)
        for ax, cond in zip(axes[0], share_conds):
            for attn in ATTENTIONS.values():
                sel = [s for s in shares if s["condition"] == cond and s["attention"] == attn]
                layers = sorted({s["layer"] for s in sel})
                for kind, style in (("digit", "-"), ("clutter", ":")):
                    means = [statistics.fmean(s[f"share {kind}"] for s in sel if s["layer"] == lay) for lay in layers]
                    if kind == "clutter" and not any(s["area clutter"] for s in sel):
                        continue
                    ax.plot(layers, [100 * m for m in means], style, marker="o", color=COLOURS[attn],
                            label=f"{attn}, {kind}" if cond == share_conds[-1] else None)
            area = [s for s in shares if s["condition"] == cond]
            ax.axhline(100 * statistics.fmean(s["area digit"] for s in area), color="grey", lw=0.8, ls="--")
            ax.set_title(cond)
            ax.set_xlabel("layer")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("% of the read-out query's attention")
        axes[0][-1].legend(fontsize=7)
        figs["attention_shares"] = fig
    # maps side by side: the read-out query's last-layer attention over the patches, same test images
    if map_runs:
        n_img = 4
        fig, axes = subplots(n_img, 1 + len(map_runs), figsize=(2.2 * (1 + len(map_runs)), 2.2 * n_img),
                             squeeze=False)
        for j, r in enumerate(map_runs):
            model, cfg, _ = load_checkpoint(r["run"].path / "checkpoints" / "last")
            data = build_data(cfg.data, img_size=model.vitlab_args["img_size"], in_chans=model.vitlab_args["in_chans"])
            x, _ = next(iter(data.loader("test", n_img)))
            last = attention_maps(model, x)[-1].mean(1)  # (B, N, N)
            p = model.num_prefix_tokens
            row = last[:, 0, p:] if model.global_pool == "token" else last[:, p:, p:].mean(1)
            side = int(round(math.sqrt(row.shape[1])))
            row = row / row.sum(1, keepdim=True)
            for i in range(n_img):
                if j == 0:
                    axes[i][0].imshow(x[i, 0], cmap="gray")
                    axes[i][0].set_title("input" if i == 0 else "")
                lim = float(row[i].abs().max())
                axes[i][j + 1].imshow(row[i].view(side, side), cmap="RdBu_r", vmin=-lim, vmax=lim)
                axes[i][j + 1].set_title(r["attention"] if i == 0 else "", fontsize=9)
        for a in axes.flat:
            a.set_xticks([])
            a.set_yticks([])
        fig.suptitle(f"Last layer, read-out query: {map_runs[0]['condition']} (red: weight, blue: negative)")
        figs["attention_maps"] = fig
    return figs


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown(columns: list[str], rows: list[dict]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows), ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="the runs of make seed002-noise (output/seed002_noise)")
    p.add_argument("--images", type=int, default=256, help="test images for the attention shares")
    p.add_argument("--docs", type=Path, help="also copy the figures (PNG) here")
    args = p.parse_args()
    rows = collect(args.root)
    if not rows:
        sys.exit(f"no finished runs under {args.root}; run make seed002-noise first")
    columns, acc = accuracy_table(rows)
    gaps = {v: paired(rows, v) for v in ("differential", "differential V2")}
    shares = measure_attention(rows, args.images)
    share_rows = []
    for key in sorted({(s["condition"], s["attention"], s["layer"]) for s in shares}, key=_order):
        sel = [s for s in shares if (s["condition"], s["attention"], s["layer"]) == key]
        row = {"condition": key[0], "attention": key[1], "layer": key[2], "runs": len(sel)}
        for k in KINDS:
            m, h = interval([s[f"share {k}"] for s in sel])
            row[f"{k} %"] = pm(m, h)
            row[f"area {k} %"] = f"{100 * statistics.fmean(s[f'area {k}'] for s in sel):.1f}"
        share_rows.append(row)
    clutter = sorted({r["condition"] for r in rows if r["condition"].startswith("canvas clutter")})
    map_cond = clutter[-1] if clutter else "MNIST clean"
    widest = max(r["width"] for r in rows)
    map_runs = [next(r for r in rows if r["condition"] == map_cond and r["attention"] == a and r["width"] == widest
                     and r["seed"] == 0) for a in ATTENTIONS.values()
                if any(r["condition"] == map_cond and r["attention"] == a and r["width"] == widest and r["seed"] == 0
                       for r in rows)]
    figs = figures(rows, gaps, shares, map_runs, args.images)
    save(figs, args.root / "plots", formats=("png",))
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for stem in figs:
            shutil.copyfile(args.root / "plots" / f"{stem}.png", args.docs / f"seed002_{stem}.png")
    write_csv(args.root / "noise_study.csv",
              [{"run": r["run"].path.name, **{k: v for k, v in r.items() if k != "run"}} for r in rows],
              ["run", "condition", "reference", "attention", "width", "seed", "top1"])
    write_csv(args.root / "attention_shares.csv", shares, list(shares[0]) if shares else ["run"])
    md = ["# Seed 002's hypothesis: classic vs differential attention under noise", "",
          f"{len(rows)} finished runs under `{args.root}`; test top-1 %, mean over seeds ± 95% t-interval.", "",
          *markdown(columns, acc)]
    for versus, g in gaps.items():
        cols = ["condition", "pairs", f"{versus} - classic (points)",
                *sorted({k for r in g for k in r if k.startswith("width ")}, key=lambda k: int(k.split()[1])),
                "minus the clean gap"]
        md += [f"## {versus} - classic, paired by (width, seed)", "", *markdown(cols, g)]
    md += ["## Attention shares (per layer; mean over runs ± 95% t-interval; area: the patches' share)", "",
           *markdown(["condition", "attention", "layer", "runs", *[f"{k} %" for k in KINDS],
                      *[f"area {k} %" for k in KINDS]], share_rows)]
    (args.root / "noise_study.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.root / 'noise_study.md'}, noise_study.csv, attention_shares.csv, plots/")


if __name__ == "__main__":
    main()
