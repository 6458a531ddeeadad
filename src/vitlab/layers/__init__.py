"""Shared building blocks. Every model family is assembled from these; none keeps a private copy."""
from .attention import Attention, LocalitySelfAttention
from .block import Block, LayerNorm, LayerScale
from .diff_attention import DiffAttention, DiffAttentionV2
from .drop_path import DropPath
from .mlp import Mlp
from .patch_embed import PATCH_EMBEDS, ConvStem, PatchEmbed, ShiftedPatchEmbed
from .pos_embed import resample_pos_embed

#: attention layers by the name `model.attn_layer` takes
ATTN_LAYERS = {"mhsa": Attention, "diff": DiffAttention, "diff2": DiffAttentionV2, "lsa": LocalitySelfAttention}

__all__ = ["ATTN_LAYERS", "PATCH_EMBEDS", "Attention", "Block", "ConvStem", "DiffAttention", "DiffAttentionV2",
           "DropPath", "LayerNorm", "LayerScale", "LocalitySelfAttention", "Mlp", "PatchEmbed", "ShiftedPatchEmbed",
           "resample_pos_embed"]
