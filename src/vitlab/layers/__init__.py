"""Shared building blocks. Every model family is assembled from these; none keeps a private copy."""
from .attention import Attention
from .block import Block, LayerScale
from .diff_attention import DiffAttention
from .drop_path import DropPath
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed
from .pos_embed import resample_pos_embed

#: attention layers by the name `model.attn_layer` takes
ATTN_LAYERS = {"mhsa": Attention, "diff": DiffAttention}

__all__ = ["ATTN_LAYERS", "Attention", "Block", "ConvStem", "DiffAttention", "DropPath", "LayerScale", "Mlp",
           "PatchEmbed", "resample_pos_embed"]
