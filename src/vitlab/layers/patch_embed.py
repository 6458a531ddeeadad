"""Patch embedding: cut the image into P x P patches and project each to D (ViT eq. 1).

The weight is stored as the usual Conv2d(C, D, kernel=P, stride=P) (`proj`, timm's key), but the forward
pass runs it as one matrix product over patchified pixels: for non-overlapping patches the two are the same
linear map, and the reshape + GEMM is faster than a strided convolution on CPU.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import TokenSet, Tokenizer, lecun_normal_, project


class TokenGrid(Tokenizer):
    """What every patch embedding shares: an S x S image becomes a (S/P) x (S/P) grid of tokens, in raster
    order, each token's box its patch (the same for every image: `fixed_layout`)."""
    fixed_layout = True

    def __init__(self, img_size: int, patch_size: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.num_tokens = self.grid_size ** 2
        self.sizes = [patch_size]
        r, c = torch.meshgrid(torch.arange(self.grid_size), torch.arange(self.grid_size), indexing="ij")
        boxes = torch.stack([c * patch_size, r * patch_size, torch.full_like(r, patch_size)], -1)  # (G, G, 3)
        self.register_buffer("boxes", boxes.reshape(-1, 3).float(), persistent=False)  # (N, 3)
        self.register_buffer("levels", torch.zeros(self.num_tokens, dtype=torch.long), persistent=False)

    def tokenize(self, x: torch.Tensor) -> TokenSet:
        return TokenSet(self(x), self.boxes.expand(len(x), -1, -1), self.levels)

    def init_weights(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def check(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size}x{self.img_size}")


class PatchEmbed(TokenGrid):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(img_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        B, C = x.shape[:2]
        P, G = self.patch_size, self.grid_size
        x = x.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * P * P)  # (B, N, C*P*P)
        return project(self.proj, x)  # (B, N, D)


class ConvStem(TokenGrid):
    """Convolutional stem (Xiao et al., arXiv 2106.14881, "ViT_C"): k stacked 3x3 stride-2 conv-BN-ReLU
    layers, then a 1x1 conv to D, in place of the P x P patchify.

    Each conv halves the grid (ceil), so k = ceil(log2 P) convs turn an S x S image into (S/P) x (S/P)
    tokens: 28 -> 14 -> 7 -> 4 for P=7, 224 -> 14 for P=16. Channels double up to D at the last conv
    (D/8, D/4, D/2, D for P=16: the paper's 48-96-192-384 for ViT-S).
    The early 3x3 convolutions give the transformer local features from the first step, which makes small
    ViTs converge much faster and with less sensitivity to the learning rate (the paper's Fig. 1, 5).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(img_size, patch_size)
        n_convs, size = 0, img_size
        while size > self.grid_size:
            size, n_convs = -(-size // 2), n_convs + 1
        if size != self.grid_size:
            raise ValueError(f"a conv stem halves {img_size} px to {size}, not to the {self.grid_size}-token grid "
                             f"of patch size {patch_size}; choose a patch size that halving reaches "
                             f"(e.g. 4, 7 or 8 at 28 px, 16 at 224 px)")
        layers, c_in = [], in_chans
        for i in range(n_convs):
            c_out = max(embed_dim >> (n_convs - 1 - i), 8)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=1)

    def init_weights(self) -> None:
        super().init_weights()
        for m in self.stem.modules():  # He init for the ReLU convs (BN starts at identity)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, G*G, D)


#: shift patterns of `ShiftedPatchEmbed`, as (dy, dx) per shifted copy in the order the copies are stacked:
#: copy pixel (i, j) = image pixel (i - dy, j - dx), zero where that falls outside (the content moves by
#: (dy, dx)); `s` is the pattern's shift in pixels.
SPT_SHIFTS = {
    # one pixel right, left, down, up: vit-pytorch's F.pad(x, shift) with shift = (1, -1, 0, 0), (-1, 1, 0, 0),
    # (0, 0, 1, -1), (0, 0, -1, 1) (`vit_for_small_dataset.SPT`, the `vit_small` of the reversible/BDIA project)
    "axis": lambda s: ((0, s), (0, -s), (s, 0), (-s, 0)),
    # half a patch on the diagonals, the paper's official code (aanna0701/SPT_LSA_ViT `models/SPT.py`
    # PatchShifting): x_lu, x_ru, x_lb, x_rb crop the padded image at its top-left, top-right, bottom-left and
    # bottom-right, so the content moves right-down, left-down, right-up and left-up
    "diagonal": lambda s: ((s, s), (s, -s), (-s, s), (-s, -s)),
}


class ShiftedPatchEmbed(TokenGrid):
    """Shifted Patch Tokenization (Lee et al., "Vision Transformer for Small-Size Datasets", arXiv 2112.13492,
    eq. 1-2): the image and four shifted copies of it (zero-filled) are stacked on the channel axis,
    patchified, and each patch goes through LayerNorm then Linear:

        S = [I; I_1; I_2; I_3; I_4]  (B, 5C, H, W),   tokens = Linear(LN(P(S)))   P: P x P patches, flattened

    so every token already sees its neighbours' border pixels (a wider receptive field for small images).
    `shifts` picks the copies (`SPT_SHIFTS`): "axis", one pixel right, left, down and up, as vit-pytorch's
    `vit_for_small_dataset.SPT` (what `vit_small` users know; `model.tokenizer=spt`), or "diagonal", half a
    patch on the four diagonals, the paper's form (`model.tokenizer=spt_paper`; at patch size 1, one pixel).

    A patch is flattened as both originals' `Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`: row, column,
    then channel (copy-major: channel index = copy * C + c), so `norm` and `proj` take their weights as they
    are (vit-pytorch's `to_patch_tokens.1/.2`, the paper's `merging.1/.2`). LayerNorm and Linear commute with
    a fixed permutation of the patch vector, so any layout is the same function class; only checkpoints care.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, shifts: str = "axis"):
        super().__init__(img_size, patch_size)
        if shifts not in SPT_SHIFTS:
            raise ValueError(f"unknown shift pattern {shifts!r}; choose one of {', '.join(SPT_SHIFTS)}")
        self.shifts = shifts
        self.shift = 1 if shifts == "axis" else max(patch_size // 2, 1)  # pixels
        patch_dim = 5 * in_chans * patch_size ** 2
        self.norm = nn.LayerNorm(patch_dim)  # torch's eps (1e-5), as both originals
        self.proj = nn.Linear(patch_dim, embed_dim)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its four shifted copies (`SPT_SHIFTS`)."""
        s, (H, W) = self.shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))  # (B, C, H+2s, W+2s)
        views = [padded[..., s - dy:s - dy + H, s - dx:s - dx + W] for dy, dx in SPT_SHIFTS[self.shifts](s)]
        return torch.cat([x, *views], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        B, C = x.shape[:2]
        P, G = self.patch_size, self.grid_size
        x = self.shifted(x)  # (B, 5C, H, W)
        x = x.reshape(B, 5 * C, G, P, G, P).permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, P * P * 5 * C)  # (p1 p2 c)
        return self.proj(self.norm(x))  # (B, N, D)


#: the grid tokenizers by the name `model.tokenizer` takes
PATCH_EMBEDS = {"patch": PatchEmbed, "conv": ConvStem, "spt": ShiftedPatchEmbed,
                "spt_paper": partial(ShiftedPatchEmbed, shifts="diagonal")}
