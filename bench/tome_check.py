"""Our token merging against the authors' own code (facebookresearch/ToMe) on the same weights.

    python bench/tome_check.py --tome-repo /path/to/ToMe      # a checkout of github.com/facebookresearch/ToMe

Builds timm's ViT, patches it with the authors' `tome.patch.timm.apply_patch`, copies its weights into
vitlab's ViT with `model.merge`, and prints the largest logit difference for several r (float64, random
weights, a batch of random images) for the constant schedule and a per-block list. The authors' package is not
on PyPI, so this check lives here rather than in the unit tests (which check the same algorithm against a
per-image transcription of the paper's steps: tests/test_token_merge.py).
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tome-repo", required=True, help="a checkout of facebookresearch/ToMe")
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, args.tome_repo)
    import timm
    import tome  # the authors' package

    import vitlab

    torch.manual_seed(0)
    theirs = timm.create_model(args.model, pretrained=False, num_classes=10).double().eval()
    tome.patch.timm(theirs, prop_attn=True)
    x = torch.randn(args.batch, 3, 224, 224, dtype=torch.float64)
    depth = len(theirs.blocks)
    worst = 0.0
    for r in (0, 4, 8, 16, [16, 12, 8, 8, 4, 4, 2, 2, 0, 0, 0, 0][:depth]):
        theirs.r = r
        ours = vitlab.create_model(args.model, num_classes=10, merge=r).double().eval()
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            a, b = theirs(x), ours(x)
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"{args.model} r={r}: max |logit difference| {diff:.2e} (logits up to {a.abs().max().item():.2f})")
    print(f"largest difference {worst:.2e}")
    sys.exit(0 if worst < 1e-8 else 1)


if __name__ == "__main__":
    main()
