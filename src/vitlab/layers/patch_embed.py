"""Patch embedding: cut the image into P x P patches and project each to D (ViT eq. 1).

The weight is stored as the usual Conv2d(C, D, kernel=P, stride=P) (`proj`, timm's key), but the forward
pass runs it as one matrix product over patchified pixels: for non-overlapping patches the two are the same
linear map, and the reshape + GEMM is faster than a strided convolution on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenGrid(nn.Module):
    """What every patch embedding shares: an S x S image becomes a (S/P) x (S/P) grid of tokens."""

    def __init__(self, img_size: int, patch_size: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2

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
        return F.linear(x, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)  # (B, N, D)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, G*G, D)


class ShiftedPatchEmbed(TokenGrid):
    """Shifted Patch Tokenization (Lee et al., "Vision Transformer for Small-Size Datasets", arXiv 2112.13492,
    eq. 1-2): the image and its four diagonal shifts by half a patch (zero-filled) are stacked on the channel
    axis, patchified, and each patch goes through LayerNorm then Linear:

        S = [I; I_lu; I_ru; I_lb; I_rb]  (B, 5C, H, W),   tokens = Linear(LN(P(S)))   P: P x P patches, flattened

    so every token already sees its neighbours' border pixels (a wider receptive field for small images).
    A patch is flattened in (channel, row, column) order, like the Conv2d weight of `PatchEmbed`.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(img_size, patch_size)
        self.shift = max(patch_size // 2, 1)
        patch_dim = 5 * in_chans * patch_size ** 2
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its left-up, right-up, left-down, right-down shifts."""
        s, (H, W) = self.shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))  # (B, C, H+2s, W+2s)
        # the content moves by (dy, dx): output pixel (i, j) reads input pixel (i - dy, j - dx)
        views = [padded[..., s - dy:s - dy + H, s - dx:s - dx + W] for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]
        return torch.cat([x, *views], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        B, C = x.shape[:2]
        P, G = self.patch_size, self.grid_size
        x = self.shifted(x)  # (B, 5C, H, W)
        x = x.reshape(B, 5 * C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, 5 * C * P * P)  # (B, N, 5CP^2)
        return self.proj(self.norm(x))  # (B, N, D)


#: patch embeddings by the name `model.patch_embed` takes
PATCH_EMBEDS = {"patch": PatchEmbed, "conv": ConvStem, "spt": ShiftedPatchEmbed}
