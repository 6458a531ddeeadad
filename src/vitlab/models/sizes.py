"""ViT sizes and names, as data.

Standard names follow timm (`vit_<size>_patch<P>_<res>`), the short names b16, l16, ... (the original ViT
project's) are aliases, and the
small-image configs serve 8-32 px datasets (digits, MNIST, CIFAR).
"""
from __future__ import annotations

from ..registry import register_model
from .vit import VisionTransformer

#: width, depth, heads (ViT paper Table 1; Ti/S from DeiT; micro/mini are ours, for small images).
SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (64, 6, 4),
    "mini": (128, 6, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

#: (size, patch, image size), the set timm ships for ImageNet.
STANDARD = [
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 8, 224), ("small", 16, 224), ("small", 16, 384), ("small", 32, 224), ("small", 32, 384),
    ("base", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
    ("large", 14, 224), ("large", 16, 224), ("large", 16, 384), ("large", 32, 224), ("large", 32, 384),
    ("huge", 14, 224),
]

#: Small-image configs: (size, patch, image size, extra defaults).
SMALL_IMAGE = [
    ("micro", 2, 8, {}),    # sklearn digits (8x8): 16 tokens
    ("micro", 7, 28, {}),   # MNIST / Fashion-MNIST: 16 tokens, the fast CPU recipe
    ("micro", 4, 28, {}),   # 49 tokens
    ("micro", 4, 32, {}),   # 64 tokens: MNIST-on-canvas, the CPU Res-ViT experiment
    ("mini", 4, 28, {}),
    ("mini", 4, 32, {}),    # CIFAR: 64 tokens
    ("tiny", 4, 32, {}),
    ("small", 4, 32, {}),
]

#: short architecture names of the original ViT project.
SHORT_NAMES = {"b16": "vit_base_patch16_224", "b32": "vit_base_patch32_224", "l16": "vit_large_patch16_224",
                "l32": "vit_large_patch32_224", "h14": "vit_huge_patch14_224"}


def register_sizes(prefix: str, builder, heads=lambda h: h, **extra) -> None:
    """Register `<prefix>_<size>_patch<P>_<res>` for every reference ViT name (a family's size table)."""
    for size, patch, img, *_ in STANDARD + SMALL_IMAGE:
        dim, depth, h = SIZES[size]
        register_model(f"{prefix}_{size}_patch{patch}_{img}", builder, img_size=img,
                       patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads(h), **extra)


def _register() -> None:
    by_target: dict[str, list[str]] = {}
    for alias, target in SHORT_NAMES.items():
        by_target.setdefault(target, []).append(alias)
    for size, patch, img, *extra in STANDARD + SMALL_IMAGE:
        dim, depth, heads = SIZES[size]
        name = f"vit_{size}_patch{patch}_{img}"
        register_model(name, VisionTransformer, aliases=tuple(by_target.get(name, ())), img_size=img,
                       patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **(extra[0] if extra else {}))


_register()
