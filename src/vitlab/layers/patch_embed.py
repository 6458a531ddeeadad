"""Patch embedding: cut the image into P x P patches and project each to D (ViT eq. 1).

The weight is stored as the usual Conv2d(C, D, kernel=P, stride=P) (`proj`, timm's key), but the forward
pass runs it as one matrix product over patchified pixels: for non-overlapping patches the two are the same
linear map, and the reshape + GEMM is faster than a strided convolution on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size}x{self.img_size}")
        P, G = self.patch_size, self.grid_size
        x = x.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, C * P * P)  # (B, N, C*P*P)
        return F.linear(x, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)  # (B, N, D)
