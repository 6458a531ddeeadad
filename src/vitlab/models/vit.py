"""The reference Vision Transformer (Dosovitskiy et al., arXiv 2010.11929).

    z0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          (eq. 1)
    z' = z + MSA(LN(z)),  z = z' + MLP(LN(z'))           (eq. 2-3, L blocks)
    y  = head(LN(z_L^0))                                 (eq. 4; or the mean of patch tokens)

State-dict keys are timm's, so timm and original-JAX weights load unchanged (see `vitlab.pretrained`), and so
is the model interface: `forward_features` (normalised tokens), `forward_head(x, pre_logits)`,
`forward_intermediates(x, indices)`.

Variants are swaps (`patch_embed`, `attn_layer`, `mlp_layer`, `tokenizer`) or subclasses that override the construction
hooks (`_build_blocks`, `_num_features`) and the block pass (`iter_blocks` / `forward_blocks`); the
constructor builds and initialises once, in one order, so at the same seed every family starts from the
reference weights wherever the shapes match.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError, did_you_mean
from ..layers import ATTN_LAYERS, PATCH_EMBEDS, Block, LayerNorm, Mlp
from ..layers.pos_embed import sincos_2d
from ..layers.quadtree import QuadtreeTokenizer, paint


def _choose(kind: str, name: str, table: dict) -> object:
    if name not in table:
        raise VitlabError(f"unknown {kind} '{name}'{did_you_mean(name, list(table))}; "
                          f"choose one of {', '.join(table)}")
    return table[name]


def attn_factory(attn_layer: str | Callable[..., nn.Module]) -> Callable[[int], Callable[..., nn.Module]]:
    """block index -> the attention constructor for that block (a name from ATTN_LAYERS, or a class); layers
    whose behaviour depends on depth (differential attention's lambda_init) receive `depth=index`."""
    if isinstance(attn_layer, str):
        attn_layer = _choose("attn_layer", attn_layer, ATTN_LAYERS)
    if getattr(attn_layer, "per_depth", False):
        return lambda i: partial(attn_layer, depth=i)
    return lambda i: attn_layer


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth grows linearly from 0 at the first block to `rate` at the last."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class VisionTransformer(nn.Module):
    base_architecture = "vit"  # report label; `architecture` adds the attention variant
    fsdp_compatible = True  # families whose backward runs blocks outside autograd's graph set False

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True,
                 global_pool: Literal["token", "avg"] = "token", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = None,
                 patch_embed: Literal["patch", "conv", "spt"] = "patch",
                 attn_layer: str | Callable[..., nn.Module] = "mhsa", mlp_layer: Callable[..., nn.Module] = Mlp,
                 tokenizer: Literal["patch", "quadtree"] = "patch", tokens: int | None = None,
                 quadtree_sizes: tuple[int, int] | None = None,
                 quadtree_score: Literal["edge", "variance"] = "edge",
                 leaf_pos: Literal["seq", "coords", "grid"] = "coords",
                 task: Literal["classify", "segment"] = "classify"):
        # One draw from the global stream seeds the initialisation, so what a subclass builds on top (a wider
        # head, transitions) cannot shift the reference weights it shares (see `init_weights`).
        init_seed = int(torch.randint(2 ** 62, (1,), device="cpu"))
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitlabError("global_pool='token' pools the class token, which class_token=False removes; "
                              "set model.global_pool=avg or model.class_token=true")
        if leaf_pos not in ("seq", "coords", "grid"):
            raise VitlabError(f"model.leaf_pos must be 'seq' (a learned row per token position), 'coords' (the "
                              f"leaf's corner and size) or 'grid' (a learned grid pooled over the leaf), "
                              f"got {leaf_pos!r}")
        self.num_classes, self.global_pool, self.embed_dim, self.task = num_classes, global_pool, embed_dim, task
        self.leaf_pos = leaf_pos  # how quadtree leaves are placed (read by _num_positions and _leaf_sizes)
        self.num_heads, self.drop_path_rate = num_heads, drop_path_rate
        self.num_prefix_tokens = 1 if class_token else 0
        self.attn_layer_name = attn_layer if isinstance(attn_layer, str) else attn_layer.__name__
        self.block_args = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                               init_values=init_values, mlp_layer=mlp_layer)
        self.attn_for = attn_factory(attn_layer)

        embed_layer = _choose("patch_embed", patch_embed, PATCH_EMBEDS)
        try:
            self.patch_embed = embed_layer(img_size, patch_size, in_chans, embed_dim)
        except ValueError as exc:
            raise VitlabError(str(exc)) from None
        self.tokenizer = None  # the patch grid; or a content quadtree of `tokens` leaves resized to the patch
        if tokenizer == "quadtree":
            if patch_embed != "patch":
                raise VitlabError(f"model.tokenizer=quadtree embeds leaves with the linear patch projection; "
                                  f"it cannot follow patch_embed={patch_embed}; set model.patch_embed=patch")
            if embed_dim % 4:
                raise VitlabError(f"model.tokenizer=quadtree places leaves by a 2-D sinusoidal code, which needs "
                                  f"embed_dim divisible by 4, got {embed_dim}")
            root, smallest = quadtree_sizes or (4 * patch_size, patch_size)
            self.tokenizer = QuadtreeTokenizer(img_size, patch_size, tokens, root, smallest, quadtree_score)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self._num_positions() + self.num_prefix_tokens, embed_dim))
        self.size_embed = nn.Embedding(self._leaf_sizes(), embed_dim) if self._leaf_sizes() else None
        if leaf_pos == "grid":  # per leaf size: (size px, cells per row of its grid, its first row in the pooled table)
            sizes = self.leaf_sizes()
            side = [img_size // s for s in sizes]
            first = [sum(n * n for n in side[:i]) for i in range(len(sizes))]
            self.register_buffer("leaf_grids", torch.tensor([sizes, side, first]).t(), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.blocks = self._build_blocks(depth)
        self.num_features = self._num_features()
        # timm's layout: final norm before pooling for the cls token, after pooling (fc_norm) for the mean.
        self.norm = LayerNorm(self.num_features) if global_pool == "token" else nn.Identity()
        self.fc_norm = LayerNorm(self.num_features) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        # segmentation: every token predicts its patch's (or leaf's) classes on a P x P grid, painted back
        outputs = num_classes * patch_size ** 2 if task == "segment" else num_classes
        self.head = nn.Linear(self.num_features, outputs) if num_classes > 0 else nn.Identity()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.init_weights()

    # -- construction hooks ----------------------------------------------------------------------------
    def _build_block(self, index: int, dim: int, num_heads: int, drop_path: float) -> Block:
        return Block(dim, num_heads, drop_path=drop_path, attn_layer=self.attn_for(index), **self.block_args)

    def _build_blocks(self, depth: int) -> nn.Sequential:
        """The block stack (the staged ViT builds stages of growing width here)."""
        rates = drop_path_rates(self.drop_path_rate, depth)
        return nn.Sequential(*[self._build_block(i, self.embed_dim, self.num_heads, rates[i]) for i in range(depth)])

    def _num_positions(self) -> int:
        """Rows of the learned position table besides the prefix tokens': one per patch of the grid."""
        return self.patch_embed.num_patches if self.tokenizer is None else self._leaf_positions(self.tokenizer.tokens)

    def _leaf_positions(self, leaves: int) -> int:
        """Position rows for `leaves` quadtree leaves: one per slot (seq), one per cell of the finest leaf grid
        (grid), none (coords: computed from the corner)."""
        finest = self.patch_embed.img_size // self.leaf_sizes()[-1]
        return {"seq": leaves, "grid": finest ** 2, "coords": 0}[self.leaf_pos]

    def _leaf_sizes(self) -> int:
        """Leaf sizes the size embedding tells apart (0: no size embedding)."""
        return len(self.tokenizer.sizes) if self.tokenizer is not None and self.leaf_pos != "seq" else 0

    def _num_features(self) -> int:
        """Width of the tokens `forward_features` returns (two streams: twice the embedding width)."""
        return self.embed_dim

    @property
    def architecture(self) -> str:
        """Report label: 'vit', 'rev_vit', 'pit_vit', ... with 'diff_' in front under differential attention."""
        return ("diff_" if self.attn_layer_name == "diff" else "") + self.base_architecture

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) for embeddings and Linear weights, zero biases (ViT/DeiT practice); the head
        comes last in module order, so a wider head leaves every other weight as the reference's."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight  # LeCun-normal on the flattened patch projection, like a Linear layer
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.patch_embed.modules():  # conv stem: He init for the ReLU convs (BN starts at identity)
            if isinstance(m, nn.Conv2d) and m is not self.patch_embed.proj:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.patch_embed.proj:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.size_embed is not None:
            nn.init.trunc_normal_(self.size_embed.weight, std=0.02)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer before every training batch; families with schedules that follow training
        (see `vitlab.objective`) override it."""

    def no_weight_decay(self) -> set[str]:
        """Parameters that the optimizer should not decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    # -- forward -----------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is not None:
            return self.embed_with_boxes(x)[0]
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.pos_drop(x + self.pos_embed)

    def project_leaves(self, leaves: torch.Tensor) -> torch.Tensor:
        """(B, T, C*P*P) -> (B, T, D): the patch projection, a Conv2d(C, D, P, P), as the Linear it is on one
        patch (flattened in (C, row, column) order)."""
        proj = self.patch_embed.proj
        return F.linear(leaves, proj.weight.reshape(proj.out_channels, -1), proj.bias)

    def embed_leaves(self, leaves: torch.Tensor, coords: torch.Tensor, size_class: torch.Tensor) -> torch.Tensor:
        """Leaves of P px (B, T, C*P*P) at corners (B, T, 2) with size classes ((T,) or (B, T)) -> [cls; tokens]
        (B, prefix + T, D): the patch projection (as the Linear it is on one patch), plus, by `leaf_pos`, the
        sinusoidal code of the corner and an embedding of the size (coords), or the learned row of each slot
        in the sequence (seq: where the leaf is only by its order), or the mean of a learned grid of the finest
        leaves' positions over the leaf's box and the size embedding (grid: the uniform ViT's learned positions,
        which it reduces to when every leaf has the finest size)."""
        tokens = self.project_leaves(leaves)
        prefix_pos, slot_pos = self.pos_embed[:, :self.num_prefix_tokens], self.pos_embed[:, self.num_prefix_tokens:]
        if self.leaf_pos == "coords":
            tokens = tokens + sincos_2d(coords, tokens.shape[-1]).to(tokens.dtype) + self.size_embed(size_class)
        elif self.leaf_pos == "grid":
            tokens = tokens + self.pooled_positions(slot_pos, coords, size_class) + self.size_embed(size_class)
        else:
            tokens = tokens + slot_pos
        if self.cls_token is not None:
            tokens = torch.cat([(self.cls_token + prefix_pos).expand(len(tokens), -1, -1), tokens], dim=1)
        return self.pos_drop(tokens)

    def pooled_positions(self, grid: torch.Tensor, coords: torch.Tensor, size_class: torch.Tensor) -> torch.Tensor:
        """Each leaf's position (B, T, D): the mean of the learned grid (1, G*G, D), one row per cell of the
        finest leaf size m, over the leaf's box. Leaves of size s sit on the s-grid (corners multiples of s), so
        the means are the grid average-pooled by s/m, one pooled table per size, indexed per leaf."""
        sizes, D = self.leaf_sizes(), grid.shape[-1]
        G = self.patch_embed.img_size // sizes[-1]
        table = grid.transpose(1, 2).reshape(1, D, G, G)
        pooled = torch.cat([F.avg_pool2d(table, s // sizes[-1]).flatten(2) for s in sizes], dim=2)[0].t()
        size, side, first = self.leaf_grids[size_class].unbind(-1)  # each (T,) or (B, T)
        cell = (coords[..., 1].long() // size) * side + coords[..., 0].long() // size  # raster index in its grid
        return pooled[first + cell]  # (B, T, D)

    def iter_blocks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each block's output tokens in turn (what `forward_intermediates` probes)."""
        for block in self.blocks:
            x = block(x)
            yield x

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + N, num_features)."""
        return self.norm(self.forward_blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (B, classes), or the pooled, normalised features (B, num_features)."""
        x = self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1)) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segment":
            return self.forward_segment(x)
        return self.forward_head(self.forward_features(x))

    def embed_with_boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedded tokens (B, prefix + T, D), each token's box (B, T, 3) as (x, y, size))."""
        if self.tokenizer is not None:
            leaves, boxes = self.tokenizer(x)  # (B, L, C*P*P), (B, L, 3)
            return self.embed_leaves(leaves, boxes[..., :2], self.tokenizer.level(boxes)), boxes
        P, G = self.patch_embed.patch_size, self.patch_embed.grid_size
        r, c = torch.meshgrid(torch.arange(G, device=x.device), torch.arange(G, device=x.device), indexing="ij")
        boxes = torch.stack([c * P, r * P, torch.full_like(r, P)], -1).reshape(1, G * G, 3).float()
        return self.embed(x), boxes.expand(len(x), -1, -1)

    def leaf_sizes(self) -> list[int]:
        """Every size a token's box can have."""
        return self.tokenizer.sizes if self.tokenizer is not None else [self.patch_embed.patch_size]

    def forward_segment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> per-pixel class logits (B, classes, H, W): each token's P x P prediction painted
        back into its box (a patch of the grid, or a leaf of a quadtree, resized)."""
        tokens, boxes = self.embed_with_boxes(x)
        # the final norm on every token: `norm` (cls pooling) or `fc_norm` (mean pooling; one is the identity)
        feats = self.fc_norm(self.norm(self.forward_blocks(tokens))[:, self.num_prefix_tokens:])  # (B, T, D)
        P = self.patch_embed.patch_size
        values = self.head(self.head_drop(feats)).unflatten(-1, (self.num_classes, P, P))  # (B, T, K, P, P)
        return paint(values, boxes, self.leaf_sizes(), x.shape[-1], mode="bilinear")

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False):
        """Outputs of the listed blocks (an int n: the last n), each (B, prefix + N, width), for probing.
        Returns (final normalised tokens, [outputs]) or, with `intermediates_only`, the list alone (and stops
        after the last listed block)."""
        depth = len(self.blocks)
        wanted = list(range(depth - indices, depth)) if isinstance(indices, int) else \
            list(range(depth)) if indices is None else [i % depth for i in indices]
        if any(not 0 <= i < depth for i in wanted):
            raise VitlabError(f"block indices {indices} out of range for a {depth}-block model")
        found: dict[int, torch.Tensor] = {}
        last = None
        for i, tokens in enumerate(self.iter_blocks(self.embed(x))):
            last = tokens
            if i in wanted:
                found[i] = tokens
            if intermediates_only and len(found) == len(set(wanted)):
                break
        outputs = [found[i] for i in wanted]
        return outputs if intermediates_only else (self.norm(last), outputs)
