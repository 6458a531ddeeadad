"""The reference Vision Transformer (Dosovitskiy et al., arXiv 2010.11929).

    z0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          (eq. 1)
    z' = z + MSA(LN(z)),  z = z' + MLP(LN(z'))           (eq. 2-3, L blocks)
    y  = head(LN(z_L^0))                                 (eq. 4; or the mean of patch tokens)

State-dict keys are timm's, so timm and original-JAX weights load unchanged (see `vitlab.pretrained`).
Other families reuse `PatchEmbed`, `Block` and this class's embedding/head methods; they replace only
`forward_blocks` or the layers handed to `Block`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import VitlabError, did_you_mean
from ..layers import ATTN_LAYERS, Block, ConvStem, Mlp, PatchEmbed
from ..layers.block import LayerNorm


def attn_factory(attn_layer: str | Callable[..., nn.Module]) -> Callable[[int], Callable[..., nn.Module]]:
    """block index -> the attention constructor for that block (a name from ATTN_LAYERS, or a class); layers
    whose behaviour depends on depth (differential attention's lambda_init) receive `depth=index`."""
    if isinstance(attn_layer, str):
        if attn_layer not in ATTN_LAYERS:
            raise VitlabError(f"unknown attn_layer '{attn_layer}'{did_you_mean(attn_layer, list(ATTN_LAYERS))}; "
                              f"choose one of {', '.join(ATTN_LAYERS)}")
        attn_layer = ATTN_LAYERS[attn_layer]
    if getattr(attn_layer, "per_depth", False):
        return lambda i: partial(attn_layer, depth=i)
    return lambda i: attn_layer


class VisionTransformer(nn.Module):
    architecture = "vit"  # report label; see registry.architecture_of
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True,
                 global_pool: Literal["token", "avg"] = "token", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = None,
                 stem: Literal["patch", "conv"] = "patch",
                 attn_layer: str | Callable[..., nn.Module] = "mhsa", mlp_layer: Callable[..., nn.Module] = Mlp):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if stem not in ("patch", "conv"):
            raise VitlabError(f"stem must be 'patch' (ViT's P x P patchify) or 'conv' (3x3 conv stem), got {stem!r}")
        if global_pool == "token" and not class_token:
            raise VitlabError("global_pool='token' pools the class token, which class_token=False removes; "
                              "set model.global_pool=avg or model.class_token=true")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0

        attn_for = attn_factory(attn_layer)
        embed_layer = ConvStem if stem == "conv" else PatchEmbed
        try:
            self.patch_embed = embed_layer(img_size, patch_size, in_chans, embed_dim)
        except ValueError as exc:
            raise VitlabError(str(exc)) from None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], init_values=init_values, mlp_layer=mlp_layer,
                  attn_layer=attn_for(i))
            for i in range(depth)])
        # timm's layout: final norm before pooling for the cls token, after pooling (fc_norm) for the mean.
        self.norm = LayerNorm(embed_dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) for embeddings and Linear weights, zero biases (ViT/DeiT practice)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # LeCun-normal on the flattened patch projection, like a Linear layer
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.patch_embed.modules():  # conv stem: He init for the ReLU convs (BN starts at identity)
            if isinstance(m, nn.Conv2d) and m is not self.patch_embed.proj:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        """Parameters that the optimizer should not decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.global_pool == "avg":
            return self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1))  # (B, D)
        return x[:, 0]  # (B, D): the cls token

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.pool(self.forward_features(x))))
