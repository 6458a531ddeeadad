"""Per-image token budgets of the content quadtree (`model.split_threshold`): tokens per image on
MNIST-on-canvas at several densities, and eval throughput against the fixed budget.

    python bench/token_budgets.py [--data_dir ../shared/data] [--images 512] [--rounds 7]
    python bench/token_budgets.py --coverage --images 2000   # the room a learned tree has (see ink_coverage)

Canvases of 64 px with 24 px MNIST test digits (normalised with `mnist_canvas`'s statistics, as a trained
model sees them): blank, one digit (the `mnist_canvas` dataset), three digits, and the same one-digit canvases
with `data.canvas_clutter=8` (eight 8 px fragments cut from other digits). For each threshold it prints mean / min / max leaves per image
per density (cells 16 -> 4 px, cap 100). Then eval img/s at batch 64 of the same model with the fixed budget
and with per-image budgets (threshold `--speed-threshold`, cap = the fixed budget) on one-digit canvases, at
the canvas model's width (D 64, depth 4) and at ViT-S width (D 384, 6 heads, depth 12): rounds alternate
between the two arms and the ratio is the median of each round's ratio (so a slow spell of a shared machine
cancels out). Accuracy is not measured here: that needs trained runs (issue 26). The tokenizer has no learned
part (the leaves follow the pixels' edge scores), so token counts, and with them the timed compute, are those
of trained weights: `--speed-sizes 16 8 --budget-step 2 --speed-threshold 5` times the trained arm of issue 26.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlab  # noqa: E402
from vitlab.data.datasets import DATASETS  # noqa: E402
from vitlab.layers.quadtree import edge_map  # noqa: E402

CANVAS, DIGIT = 64, 24


def canvases(data_dir: str, n: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """Normalised canvases by density, and the normalisation (mean, std) of `mnist_canvas`."""
    raw = DATASETS["mnist_canvas"](data_dir=data_dir, download=False, canvas_size=CANVAS, canvas_digit_size=DIGIT,
                                   split_seed=0)
    test = raw.test.images  # CanvasDigits
    one = test[torch.arange(n)].float() / 255  # (n, 1, 64, 64): one digit each
    g = torch.Generator().manual_seed(0)
    digits = test.digits.float() / 255  # (N, 1, 24, 24)

    def paste(img: torch.Tensor, patch: torch.Tensor) -> None:
        s = patch.shape[-1]
        y, x = torch.randint(0, CANVAS - s + 1, (2,), generator=g).tolist()
        img[:, y:y + s, x:x + s] = torch.maximum(img[:, y:y + s, x:x + s], patch)

    three = one.clone()  # two more whole digits pasted on each canvas
    for i in range(n):
        for j in torch.randint(0, len(digits), (2,), generator=g).tolist():
            paste(three[i], digits[j])
    # the same canvases with data.canvas_clutter=8: eight 8 px fragments of other digits (the digits stay put)
    clutter = DATASETS["mnist_canvas"](data_dir=data_dir, download=False, canvas_size=CANVAS, canvas_digit_size=DIGIT,
                                       split_seed=0, canvas_clutter=8).test.images[torch.arange(n)].float() / 255
    mean, std = raw.info.mean[0], raw.info.std[0]
    sets = {"blank": torch.zeros_like(one), "1 digit": one, "3 digits": three, "1 digit + clutter": clutter}
    return {k: (v - mean) / std for k, v in sets.items()}, mean, std


def ink_coverage(data_dir: str, n: int, clutters: tuple[int, ...] = (0, 3, 8), splits: tuple[int, ...] = (6, 8, 12)):
    """How much room a learned 16 -> 8 px tree has over the edge heuristic: the share of the digit's ink (the
    canvas without its distractors) inside the k roots of 16 px that the heuristic splits (highest edge sum),
    against the best k roots for the digit (100% whenever k covers every root it touches), per
    `data.canvas_clutter` level; mean over `n` test canvases."""
    print(f"\nShare of the digit's ink in the split roots (16 roots of 16 px, {n} test canvases): heuristic / best")
    print("| clutter | " + " | ".join(f"{k} splits" for k in splits) + " |")
    print("|---:|" + "---:|" * len(splits))
    for clutter in clutters:
        raw = DATASETS["mnist_canvas"](data_dir=data_dir, download=False, canvas_size=CANVAS, canvas_digit_size=DIGIT,
                                       split_seed=0, canvas_clutter=clutter)
        idx = torch.arange(n)
        x = raw.test.images[idx].float() / 255
        ink = raw.test.images.render(idx, clutter=False).float()
        edges = torch.nn.functional.avg_pool2d(edge_map(x), 16).flatten(1)  # (n, 16): each root's edge score
        mass = torch.nn.functional.avg_pool2d(ink, 16).flatten(1)  # (n, 16): each root's share of the ink
        total = mass.sum(1)
        cells = [f"{(mass.gather(1, edges.topk(k, 1).indices).sum(1) / total).mean():.3f} / "
                 f"{(mass.topk(k, 1).values.sum(1) / total).mean():.3f}" for k in splits]
        print(f"| {clutter} | " + " | ".join(cells) + " |")


def model(width: int, depth: int, heads: int, tokens: int, threshold: float | None, sizes: tuple[int, int] = (16, 4),
          budget_step: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_tiny_patch16_224", img_size=CANVAS, patch_size=sizes[1], in_chans=1,
                               embed_dim=width, depth=depth, num_heads=heads, num_classes=10, global_pool="avg",
                               class_token=False, tokenizer="quadtree", tokens=tokens, quadtree_sizes=sizes,
                               split_threshold=threshold, budget_step=budget_step).eval()


@torch.inference_mode()
def img_per_s(m: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), 64):
        m(x[i:i + 64])
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="../shared/data")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[8.0, 16.0, 32.0, 64.0])
    ap.add_argument("--speed-threshold", type=float, default=16.0)
    ap.add_argument("--fixed", type=int, default=52, help="the fixed budget (make gdt's 52 leaves)")
    ap.add_argument("--speed-sizes", type=int, nargs=2, default=[16, 4], metavar=("ROOT", "LEAF"),
                    help="the timed models' cells (16 8 with --budget-step 2: the trained arm of issue 26)")
    ap.add_argument("--budget-step", type=int, default=4, help="splits per image rounded up to a multiple of this")
    ap.add_argument("--widths", default="64x4x4,384x12x6", help="width x depth x heads of each timed model")
    ap.add_argument("--coverage", action="store_true", help="only the ink coverage of the heuristic's split roots")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.coverage:
        return ink_coverage(args.data_dir, args.images)
    sets, mean, std = canvases(args.data_dir, args.images)
    print(f"MNIST-on-canvas {CANVAS} px, {args.images} test images per density, cells 16 -> 4 px, cap 100; "
          f"normalised with mean {mean:.4f}, std {std:.4f}")
    print("| threshold | " + " | ".join(sets) + " |")
    print("|---:|" + "---:|" * len(sets))
    for t in args.thresholds:
        tok = model(64, 1, 4, 100, t).tokenizer
        cells = []
        for x in sets.values():
            c = torch.cat([tok.tokenize(x[i:i + 256]).counts for i in range(0, len(x), 256)]).float()
            cells.append(f"{c.mean():.1f} ({int(c.min())}-{int(c.max())})")
        print(f"| {t:g} | " + " | ".join(cells) + " |")

    x = sets["1 digit"]
    sizes = tuple(args.speed_sizes)
    try:
        shapes = [tuple(int(v) for v in w.split("x")) for w in args.widths.split(",")]
        assert all(len(s) == 3 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--widths {args.widths!r}: give width x depth x heads, comma-separated (64x4x4,384x12x6)")
    for width, depth, heads in shapes:
        fixed = model(width, depth, heads, args.fixed, None, sizes)
        adaptive = model(width, depth, heads, args.fixed, args.speed_threshold, sizes, args.budget_step)
        counts = torch.cat([adaptive.tokenize(x[i:i + 256]).counts for i in range(0, len(x), 256)]).float()
        img_per_s(fixed, x[:64]), img_per_s(adaptive, x[:64])  # warm-up
        ratios, f_s, a_s = [], [], []
        for _ in range(args.rounds):
            f_s.append(img_per_s(fixed, x))
            a_s.append(img_per_s(adaptive, x))
            ratios.append(a_s[-1] / f_s[-1])
        print(f"D {width}, depth {depth}: fixed {args.fixed} tokens {statistics.median(f_s):.0f} img/s; per-image "
              f"budgets (cells {sizes[0]}->{sizes[1]} px, threshold {args.speed_threshold:g}, step {args.budget_step}, "
              f"cap {args.fixed}) mean {counts.mean():.1f} tokens "
              f"({100 * (1 - counts.mean() / args.fixed):.0f}% fewer) {statistics.median(a_s):.0f} img/s; "
              f"speed-up {statistics.median(ratios):.2f}x (median of {args.rounds} rounds, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
