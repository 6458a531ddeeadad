"""Seed 002's hypothesis, measured: is the differential ViT better on noisy data? The analysis of
`make seed002-noise` (configs/experiments/seed002_noise/), from the run directories alone.

    python bench/seed002_noise.py output/seed002_noise [--images 256] [--docs docs/experiments]

For every finished run under the folder: its noise condition (pixel noise, label noise, canvas clutter, from
its config), attention (classic, differential V1, V2: the run's architecture), size (the width a sweep sets, or
the size label of a named model such as vit_classic_10m) and seed, and test top-1 from results.json. Then:

* accuracy per (condition, attention, size): the mean over seeds with a 95% t-interval;
* the paired difference differential - classic (and V2 - classic) per condition, paired by (size, seed),
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vitlab.attention_maps import (attention_maps, attention_shares, negative_share, patch_kinds,  # noqa: E402
                                   readout_row)
from vitlab.data import build_data  # noqa: E402
from vitlab.data.datasets import CanvasDigits  # noqa: E402
from vitlab.data.loaders import _tensors  # noqa: E402
from vitlab.data.noise import NoisyImages  # noqa: E402
from vitlab.experiments.runs import find_runs  # noqa: E402
from vitlab.names import csv_cell, printable  # noqa: E402
from vitlab.plots.common import plot_text, save, subplots  # noqa: E402
from vitlab.train import load_checkpoint  # noqa: E402

ATTENTIONS = {"vit": "classic", "diff_vit": "differential", "diff2_vit": "differential V2"}  # by architecture
KINDS = ["background", "digit", "clutter"]
COLOURS = {"classic": "tab:blue", "differential": "tab:orange", "differential V2": "tab:green"}


def condition(cfg: dict) -> tuple[str, str]:
    """(condition, its clean reference) from a run's flat config: the dataset and its noise."""
    dataset = cfg.get("data.dataset") or "digits"
    name = {"mnist": "MNIST", "mnist_canvas": "canvas"}.get(dataset, dataset)
    clean = f"{name} clean"
    noise = []
    clutter = int(cfg.get("data.canvas_clutter", 0) or 0)
    pixel, label = float(cfg.get("data.pixel_noise", 0) or 0), float(cfg.get("data.label_noise", 0) or 0)
    if clutter:
        noise.append(f"clutter {clutter}")
    if pixel:
        noise.append(f"pixel noise {pixel:g}")
    if label:
        noise.append(f"label noise {label:.0%}")
    return (f"{name} " + " + ".join(noise) if noise else clean), clean


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for fewer than two values."""
    from scipy.stats import t

    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def pm(mean: float, half: float) -> str:
    """Points (x 100) with the interval's half-width."""
    return f"{100 * mean:.2f} ± {100 * half:.2f}" if not math.isnan(half) else f"{100 * mean:.2f}"


def collect(root: Path) -> list[dict]:
    rows = []
    for run in find_runs([root], finished_only=True):
        cfg = run.flat_config
        attn = ATTENTIONS.get(run.architecture)
        if attn is None:  # another family: not part of this comparison
            continue
        cond, ref = condition(cfg)
        # the size: the width a sweep sets, else the model name's size label (vit_classic_10m -> 10m)
        size = cfg.get("model.embed_dim") or run.model.rsplit("_", 1)[-1]
        rows.append({"run": run, "condition": cond, "reference": ref, "attention": attn, "size": size,
                     "seed": int(cfg.get("train.seed", 0)), "top1": float(run.results["test_top1"])})
    seen: dict[tuple, Path] = {}
    for r in rows:  # two runs of one point would be averaged as seeds and paired arbitrarily
        key = (r["condition"], r["attention"], r["size"], r["seed"])
        if key in seen:
            sys.exit(f"{seen[key]} and {r['run'].path} are the same point {key}; analyse one of them")
        seen[key] = r["run"].path
    return rows


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["condition"], r["attention"], r["size"])].append(r["top1"])
    out = []
    for (cond, attn, size), values in sorted(groups.items(), key=lambda kv: (_order(kv[0][:2]), _size_order(kv[0][2]))):
        mean, half = interval(values)
        out.append({"condition": cond, "attention": attn, "size": size, "seeds": len(values),
                    "top1 %": pm(mean, half), "mean": mean, "ci": half})
    return ["condition", "attention", "size", "seeds", "top1 %"], out


def summary_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per condition, one column per attention: top-1 over every size and seed (mean ± 95% interval;
    the sizes' own differences widen it)."""
    conds = sorted({r["condition"] for r in rows}, key=lambda c: _order((c,)))
    attns = [a for a in ATTENTIONS.values() if any(r["attention"] == a for r in rows)]
    out = []
    for c in conds:
        row = {"condition": c}
        for a in attns:
            values = [r["top1"] for r in rows if r["condition"] == c and r["attention"] == a]
            row[a] = f"{pm(*interval(values))} (n={len(values)})" if values else ""
        out.append(row)
    return ["condition", *attns], out


def paired(rows: list[dict], versus: str) -> list[dict]:
    """Per condition: `versus` - classic, paired by (size, seed), and that gap minus the gap on the clean
    reference (paired by (size, seed) as well)."""
    acc = {(r["condition"], r["attention"], r["size"], r["seed"]): r["top1"] for r in rows}
    refs = {r["condition"]: r["reference"] for r in rows}
    gap = {(c, w, s): acc[(c, versus, w, s)] - acc[(c, "classic", w, s)]
           for (c, a, w, s) in acc if a == versus and (c, "classic", w, s) in acc}
    out = []
    for cond in sorted({c for c, _, _ in gap}, key=lambda c: _order((c,))):
        keys = sorted(((w, s) for c, w, s in gap if c == cond), key=lambda k: (_size_order(k[0]), k[1]))
        mean, half = interval([gap[(cond, *k)] for k in keys])
        row = {"condition": cond, "pairs": len(keys), f"{versus} - classic (points)": pm(mean, half),
               "mean": mean, "ci": half}
        for w in sorted({w for w, _ in keys}, key=_size_order):
            m, h = interval([gap[(cond, w, s)] for ww, s in keys if ww == w])
            row[f"size {w}"] = pm(m, h)
        ref = refs[cond]
        if ref != cond:
            both = [k for k in keys if (ref, *k) in gap]
            m, h = interval([gap[(cond, *k)] - gap[(ref, *k)] for k in both]) if both else (math.nan, math.nan)
            row["minus the clean gap"] = pm(m, h)
        out.append(row)
    return out


def _size_order(label: str) -> tuple:
    """'size 32' < 'size 48'; '10m' < '25m' by number, whatever the unit."""
    text = str(label).split()[-1]
    digits = "".join(ch for ch in text if ch.isdigit())
    return (int(digits) if digits else 0, text)


def _order(key: tuple) -> tuple:
    """Clean first, then pixel noise, label noise, clutter; datasets apart."""
    cond = key[0]
    rank = 0 if cond.endswith(" clean") else 1 if "pixel" in cond else 2 if "label" in cond else 3
    return (cond.split()[0], rank, cond, *key[1:])


def ink(split, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(digit ink, clutter ink) of test images `index` at the model's `size`, each (B, size, size) in [0, 1],
    without pixel noise; None where the images have no digit to find (not MNIST or MNIST-on-canvas)."""
    images, _ = _tensors(split)
    base = images.images if isinstance(images, NoisyImages) else images
    if isinstance(base, CanvasDigits):
        digit = base.render(index, clutter=False).float() / 255
        clutter = (base.render(index).float() / 255 - digit).clamp(min=0)
    elif isinstance(base, torch.Tensor) and base.shape[1:] == (1, 28, 28):  # MNIST's digits fill the image
        digit = base[index].float() / 255
        clutter = torch.zeros_like(digit)
    else:
        return None
    if digit.shape[-1] != size:
        digit, clutter = (F.interpolate(t, size=(size, size), mode="bilinear", antialias=True) for t in (digit, clutter))
    return digit[:, 0], clutter[:, 0]


def measure_attention(rows: list[dict], images: int) -> list[dict]:
    """Per run and layer: the shares of attention on background / digit / clutter patches (and their area),
    for runs on MNIST or MNIST-on-canvas (other datasets have no labelled patches)."""
    out, data_cache = [], {}
    for r in rows:
        model, cfg, _ = load_checkpoint(r["run"].path / "checkpoints" / "last")
        size = model.vitlab_args["img_size"]
        key = repr(cfg.data)
        if key not in data_cache:
            data = build_data(cfg.data, img_size=size, in_chans=model.vitlab_args["in_chans"])
            x, _ = next(iter(data.loader("test", images)))
            found = ink(data.splits["test"], torch.arange(len(x)), size)
            data_cache[key] = (x, *found) if found is not None else None
        if data_cache[key] is None:
            continue
        x, digit, clutter = data_cache[key]
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        kinds = patch_kinds(digit, clutter, patch)
        prefix, query = model.num_prefix_tokens, "cls" if model.global_pool == "token" else "mean"
        rows_per_layer = [torch.cat(parts) for parts in zip(*(
            attention_maps(model, chunk, reduce=lambda m: readout_row(m, prefix, query)) for chunk in x.split(64)))]
        shares = attention_shares(rows_per_layer, kinds, len(KINDS), prefix)
        negative = negative_share(rows_per_layer, prefix)
        area = F.one_hot(kinds, len(KINDS)).float().mean((0, 1))
        for layer, s in enumerate(shares.tolist()):
            out.append({"run": r["run"].path.name, "condition": r["condition"], "attention": r["attention"],
                        "size": r["size"], "seed": r["seed"], "layer": layer + 1, "query": query,
                        **{f"share {k}": v for k, v in zip(KINDS, s)}, "negative": float(negative[layer]),
                        **{f"area {k}": float(a) for k, a in zip(KINDS, area)}})
    return out


def paired_shares(shares: list[dict], versus: str) -> list[dict]:
    """Per condition: `versus`'s share of positive attention on the digit minus classic's, in the first and the
    last layer, paired by (size, seed); and the same for clutter where there is some."""
    by = {(s["condition"], s["attention"], s["size"], s["seed"], s["layer"]): s for s in shares}
    out = []
    for cond in sorted({s["condition"] for s in shares}, key=lambda c: _order((c,))):
        last = max(s["layer"] for s in shares if s["condition"] == cond)
        row = {"condition": cond}
        for kind in ("digit", "clutter"):
            if kind == "clutter" and not any(s["area clutter"] for s in shares if s["condition"] == cond):
                continue
            for layer in (1, last):
                diffs = [by[(c, versus, z, e, layer)][f"share {kind}"] - by[(c, "classic", z, e, layer)][f"share {kind}"]
                         for (c, a, z, e, lay) in by if c == cond and a == versus and lay == layer
                         and (c, "classic", z, e, layer) in by]
                if diffs:
                    row[f"{kind}, layer {layer}"] = f"{pm(*interval(diffs))} (n={len(diffs)})"
        out.append(row)
    return out


def figures(rows: list[dict], gaps: dict[str, list[dict]], shares: list[dict], map_runs: list[dict]) -> dict:
    figs = {}
    # accuracy per condition and attention, means over sizes and seeds with 95% intervals
    conds = sorted({r["condition"] for r in rows}, key=lambda c: _order((c,)))

    def panel(series: list[tuple[str, list[float], list[float], list[float]]], ylabel: str, title: str):
        """One marker with its 95% interval per (label, x, mean, half-width) series, conditions on the x axis."""
        fig, ax = subplots(figsize=(max(7.0, 1.1 * len(conds)), 4.2))
        for label, xs, means, halves in series:
            ax.errorbar(xs, [100 * m for m in means], yerr=[0 if math.isnan(h) else 100 * h for h in halves],
                        fmt="o", capsize=3, color=COLOURS[label.split(" - ")[0]], label=label)
        ax.set_xticks(range(len(conds)), [plot_text(c) for c in conds], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        return fig, ax

    series = []
    for i, attn in enumerate(ATTENTIONS.values()):
        stats = [interval([r["top1"] for r in rows if r["condition"] == c and r["attention"] == attn] or [math.nan])
                 for c in conds]
        series.append((attn, [j + (i - 1) * 0.22 for j in range(len(conds))], *zip(*stats)))
    figs["noise_accuracy"], _ = panel(series, "test top-1 % (mean over sizes and seeds, 95% CI)",
                                      "Classic and differential ViTs under noise")
    series = [(f"{versus} - classic", [conds.index(g["condition"]) + (i - 0.5) * 0.25 for g in rows_v],
               [g["mean"] for g in rows_v], [g["ci"] for g in rows_v]) for i, (versus, rows_v) in enumerate(gaps.items())]
    fig, ax = panel(series, "paired difference, points (95% CI)", "Differential minus classic, paired by size and seed")
    ax.axhline(0, color="black", lw=0.8)
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
            ax.set_title(plot_text(cond))
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
            p = model.num_prefix_tokens
            query = "cls" if model.global_pool == "token" else "mean"
            row = attention_maps(model, x, reduce=lambda m: readout_row(m, p, query))[-1][:, p:]  # (B, T)
            side = int(round(math.sqrt(row.shape[1])))
            row = row / row.sum(1, keepdim=True)
            H, W = x.shape[-2:]
            for i in range(n_img):
                if j == 0:
                    axes[i][0].imshow(x[i, 0], cmap="gray")
                    axes[i][0].set_title("input" if i == 0 else "", fontsize=9)
                lim = float(row[i].abs().max())
                axes[i][j + 1].imshow(x[i, 0], cmap="gray")  # the map over its image, patch by patch
                axes[i][j + 1].imshow(row[i].view(side, side), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.65,
                                      extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
                axes[i][j + 1].set_title(r["attention"] if i == 0 else "", fontsize=9)
        for a in axes.flat:
            a.set_xticks([])
            a.set_yticks([])
        fig.suptitle(f"{plot_text(map_runs[0]['condition'])}, size {map_runs[0]['size']}, seed {map_runs[0]['seed']}: last "
                     "layer's read-out\n"
                     "query over the patches (red: weight; blue: negative weight)", fontsize=9)
        figs["attention_maps"] = fig
    return figs


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)  # names from run dirs: never formulas


def markdown(columns: list[str], rows: list[dict]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(printable(str(r.get(c, ""))).replace("|", "\\|") for c in columns) + " |"
              for r in rows), ""]


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
        row["negative %"] = pm(*interval([s["negative"] for s in sel]))
        share_rows.append(row)
    # the maps: the noisiest condition with labelled patches (clutter first), else the first condition
    labelled = sorted({s["condition"] for s in shares}, key=lambda c: _order((c,))) or [rows[0]["condition"]]
    map_cond = next((c for c in reversed(labelled) if "clutter" in c), labelled[-1])
    largest = max((r["size"] for r in rows), key=_size_order)
    pick = {r["attention"]: r for r in rows
            if r["condition"] == map_cond and r["size"] == largest and r["seed"] == min(q["seed"] for q in rows)}
    map_runs = [pick[a] for a in ATTENTIONS.values() if a in pick]
    figs = figures(rows, gaps, shares, map_runs)
    save(figs, args.root / "plots", formats=("png",))
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for stem in figs:
            shutil.copyfile(args.root / "plots" / f"{stem}.png", args.docs / f"seed002_{stem}.png")
    write_csv(args.root / "noise_study.csv",
              [{"run": r["run"].path.name, **{k: v for k, v in r.items() if k != "run"}} for r in rows],
              ["run", "condition", "reference", "attention", "size", "seed", "top1"])
    write_csv(args.root / "attention_shares.csv", shares, list(shares[0]) if shares else ["run"])
    md = ["# Seed 002's hypothesis: classic vs differential attention under noise", "",
          f"{len(rows)} finished runs under `{args.root}`; test top-1 %, mean ± 95% t-interval over sizes and "
          "seeds (first table) or seeds (per size).", "",
          *markdown(*summary_table(rows)), "Per size:", "", *markdown(columns, acc)]
    for versus, g in gaps.items():
        cols = ["condition", "pairs", f"{versus} - classic (points)",
                *sorted({k for r in g for k in r if k.startswith("size ")}, key=_size_order),
                "minus the clean gap"]
        md += [f"## {versus} - classic, paired by (size, seed)", "", *markdown(cols, g)]
    md += ["## Attention shares", "",
           "Per layer, the share of the read-out query's positive attention on each kind of patch (mean over runs "
           "± 95% t-interval); area: the patches' share of the image; negative: the negative weights' share of "
           "all absolute weight (differential maps only).", "",
           *markdown(["condition", "attention", "layer", "runs", *[f"{k} %" for k in KINDS],
                      *[f"area {k} %" for k in KINDS], "negative %"], share_rows)]
    for versus in gaps:
        g = paired_shares(shares, versus)
        cols = ["condition", *dict.fromkeys(k for r in g for k in r if k != "condition")]
        md += [f"## Share of positive attention, {versus} - classic (points; paired by size and seed)", "",
               *markdown(cols, g)]
    (args.root / "noise_study.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.root / 'noise_study.md'}, noise_study.csv, attention_shares.csv, plots/")


if __name__ == "__main__":
    main()
