"""Differential ViT (Ye et al., arXiv 2410.05258, in a ViT) and the classic-vs-differential
scaling study's families.

Differential attention is a swap of the reference ViT's attention (`attn_layer="diff"`, see
`layers/diff_attention.py`), so there is no model class here, only names:

- `diff_vit_<size>_patch<P>_<res>` for every reference ViT name, with half the heads (the paper's rule, which
  keeps the sub-head size and the parameter count; Ti's 3 heads become 1).
- the classic-vs-differential scaling study: `vit_classic_{10m,25m,50m}` / `vit_differential_{10m,25m,50m}` (CIFAR-100
  protocol: 224 px, patch 8, d_model 256, 100 classes) and `vit_{classic,differential}_bach_{10m,25m,50m}`
  (BACH: 512 px, patch 16, d_model 384, 4 classes). d_model is fixed by the study, so size comes from depth
  and MLP ratio; classic and differential of one size differ only by lambda vectors and sub-norms (< 0.1%).
  The study's labels "10B/25B/50B" are aliases (they meant millions). `vit_differential_v2_*` swap in
  differential attention V2 (`attn_layer="diff2"`), which keeps the classic layer's heads and doubles its
  queries: about 1/12 more parameters per block at MLP ratio 4 (D^2 + D more in q, D x H in lambda).
"""
from __future__ import annotations

from ..registry import register_alias, register_model
from .vit import VisionTransformer
from .sizes import register_sizes

#: the study's protocols: (image size, patch, width, heads of the classic model, classes)
PROTOCOLS = {"": (224, 8, 256, 8, 100), "bach_": (512, 16, 384, 6, 4)}
#: (depth, mlp ratio) per size label, per protocol; parameter counts are checked by tests/test_diff_vit.py
SCALES = {"": {"10m": (12, 4.0), "25m": (24, 6.0), "50m": (48, 6.0)},
          "bach_": {"10m": (5, 4.0), "25m": (14, 4.0), "50m": (28, 4.0)}}


def _register() -> None:
    register_sizes("diff_vit", VisionTransformer, heads=lambda h: max(h // 2, 1),
                   attn_layer="diff")
    for proto, (img, patch, dim, heads, classes) in PROTOCOLS.items():
        for label, (depth, ratio) in SCALES[proto].items():
            common = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, mlp_ratio=ratio,
                          num_classes=classes)
            for kind, attn, h in (("classic", "mhsa", heads), ("differential", "diff", heads // 2),
                                  ("differential_v2", "diff2", heads)):
                name = f"vit_{kind}_{proto}{label}"
                register_model(name, VisionTransformer, num_heads=h, attn_layer=attn, **common)
                if attn == "diff2":  # not in the study: no alias for its size labels
                    continue
                register_alias(f"vit_{kind}_{proto}{label[:-1]}b", name,
                               note=f"the classic-vs-differential size label '{label[:-1]}B' means "
                                    f"~{label[:-1]}M parameters: "
                                    f"using {name}")


_register()
