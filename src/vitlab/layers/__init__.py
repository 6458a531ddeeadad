"""Shared building blocks. Every model family is assembled from these; none keeps a private copy."""
from .attention import Attention
from .block import Block, LayerScale
from .drop_path import DropPath
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed
from .pos_embed import resample_pos_embed

__all__ = ["Attention", "Block", "ConvStem", "DropPath", "LayerScale", "Mlp", "PatchEmbed", "resample_pos_embed"]
