"""ViT-small for small datasets: the `--net` names of the reversible/BDIA project.

That project trains one CIFAR-10 ViT (patch 4 on 32 px, width 512, depth 6, 8 heads, MLP width 512,
dropout 0.1) with the layers of "Vision Transformer for Small-Size Datasets" (Lee et al., arXiv
2112.13492): Shifted Patch Tokenization and Locality Self-Attention with bias-free qkv. We register it as a
standard, reversible, BDIA and momentum model; `model.tokenizer=patch model.attn_layer=mhsa` gives the
plain-layer versions.
"""
from __future__ import annotations

from ..registry import register_model
from .bdia_vit import BDIAViT
from .momentum_vit import MomentumViT
from .rev_vit import RevViT
from .vit import VisionTransformer

SMALL_DATASET_VIT = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.0,
                         drop_rate=0.1, num_classes=10, tokenizer="spt", attn_layer="lsa", qkv_bias=False,
                         norm_eps=1e-5)

for name, builder in (("vit_small", VisionTransformer), ("vit_small_reverse", RevViT),
                      ("vit_small_bdia", BDIAViT), ("vit_small_momentum", MomentumViT)):
    register_model(name, builder, **SMALL_DATASET_VIT)
