"""The reference Vision Transformer (Dosovitskiy et al., arXiv 2010.11929).

    z0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          (eq. 1)
    z' = z + MSA(LN(z)),  z = z' + MLP(LN(z'))           (eq. 2-3, L blocks)
    y  = head(LN(z_L^0))                                 (eq. 4; or the mean of patch tokens)

A model is tokenizer -> blocks -> head, each a swappable part chosen by name:
- `tokenizer` (layers/tokenizer.py): where the tokens x_p E come from, with their boxes: the patch grid, a
  conv stem, shifted patches, a content quadtree (`layers/quadtree.py`) or a learned one (GDT-ViT);
- blocks: `attn_layer` / `mlp_layer` swap inside the reference `Block`; families change the update rule
  (`forward_blocks`: reversible, BDIA, momentum, routed) or the stack (`_build_blocks`: stages); `merge`
  merges similar tokens inside the blocks (ToMe, `layers/token_merge.py`) and gives them back unmerged;
- `head`: what the tokens become: class logits (`layers/classifier_head.py`) or a mask painted from each
  token's box (`layers/segment_head.py`).

State-dict keys are timm's, so timm and original-JAX weights load unchanged (see `vitlab.pretrained`), and so
is the model interface: `forward_features` (normalised tokens), `forward_head(x, pre_logits)`,
`forward_intermediates(x, indices)`. The constructor builds and initialises once, in one order, so at the same
seed every family starts from the reference weights wherever the shapes match.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from ..errors import VitlabError, did_you_mean
from ..layers import ATTN_LAYERS, PATCH_EMBEDS, Block, LayerNorm, Mlp
from ..layers.classifier_head import ClassifierHead
from ..layers.leaf_positions import LeafPositions
from ..layers.quadtree import QuadtreeTokenizer
from ..layers.segment_head import SegmentHead
from ..layers.token_merge import TokenMerging, merge_schedule
from ..layers.tokenizer import TokenGroups, TokenSet, Tokenizer

#: tokenizers by the name `model.tokenizer` takes (GDT-ViT's learned quadtree comes with its own arguments)
TOKENIZERS = (*PATCH_EMBEDS, "quadtree")
HEADS = ("classify", "segment")


def _choose(kind: str, name: str, table) -> object:
    if name not in table:
        raise VitlabError(f"unknown {kind} '{name}'{did_you_mean(name, list(table))}; "
                          f"choose one of {', '.join(table)}")
    return table[name] if isinstance(table, dict) else name


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
    _kind = "vit"  # the family's part of `architecture`, the one name of what a model is
    fsdp_compatible = True  # families whose backward runs blocks outside autograd's graph set False
    merges_tokens = True  # families whose update rule is not the plain block stack set False (no `merge`)
    #: arguments for counting FLOPs on the meta device, where nothing data-dependent can run: per-image budgets
    #: are counted at their cap (the worst case; bench/token_reduction.py measures the mean tokens)
    static_flops_args = {"split_threshold": None}

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, class_token: bool = True,
                 global_pool: Literal["token", "avg"] = "token", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = None,
                 norm_eps: float = 1e-6,
                 attn_layer: str | Callable[..., nn.Module] = "mhsa", mlp_layer: Callable[..., nn.Module] = Mlp,
                 tokenizer: Literal["patch", "conv", "spt", "spt_paper", "quadtree"] | Callable[..., Tokenizer]
                 = "patch",
                 tokens: int | None = None, quadtree_sizes: tuple[int, int] | None = None,
                 quadtree_score: Literal["edge", "variance"] = "edge", split_threshold: float | None = None,
                 budget_step: int = 4,
                 leaf_pos: Literal["seq", "coords", "grid"] = "coords",
                 head: Literal["classify", "segment"] = "classify",
                 merge: int | list[int] | None = None, merge_prop_attn: bool = True):
        """tokenizer: a name, or a callable (img_size, patch_size, in_chans, embed_dim) -> Tokenizer;
        tokens, quadtree_sizes ([root, smallest] px), quadtree_score: the content quadtree's budget and cells;
        split_threshold, budget_step: per-image budgets (leaves split while their score is above the threshold,
        `tokens` the cap; `layers/quadtree.py`);
        leaf_pos: how tokens that are not a fixed grid are placed (`layers/leaf_positions.py`);
        norm_eps: every LayerNorm's epsilon (timm's 1e-6; torch's default 1e-5 in the original projects);
        merge: tokens ToMe merges away in each block (an int: every block; a list: one per block), with
        proportional attention unless merge_prop_attn is False (ToMe's setting for training from scratch)."""
        # One draw from the global stream seeds the initialisation, so what a subclass builds on top (a wider
        # head, transitions) cannot shift the reference weights it shares (see `init_weights`).
        init_seed = int(torch.randint(2 ** 62, (1,), device="cpu"))
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise VitlabError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitlabError("global_pool='token' pools the class token, which class_token=False removes; "
                              "set model.global_pool=avg or model.class_token=true")
        _choose("head", head, HEADS)
        if not norm_eps > 0:
            raise VitlabError(f"model.norm_eps must be positive (timm's 1e-6, torch's 1e-5), got {norm_eps}")
        if tokenizer != "quadtree" and (tokens is not None or quadtree_sizes is not None
                                        or split_threshold is not None):
            raise VitlabError("model.tokens, model.quadtree_sizes and model.split_threshold shape the content "
                              "quadtree; set model.tokenizer=quadtree or drop them")
        if merge and not self.merges_tokens:
            raise VitlabError(f"model.merge (token merging) runs on the plain block stack (ViT, differential, "
                              f"LSA/SPT, staged, GDT); {type(self).__name__} has its own update rule: drop "
                              f"model.merge")
        self.merge, self.merge_prop_attn = merge_schedule(merge, depth), merge_prop_attn
        self.num_classes, self.global_pool, self.embed_dim = num_classes, global_pool, embed_dim
        self.num_heads, self.drop_path_rate = num_heads, drop_path_rate
        self.num_prefix_tokens = 1 if class_token else 0
        self.attn_layer_name = attn_layer if isinstance(attn_layer, str) else attn_layer.__name__
        self.norm_eps = norm_eps
        self.block_args = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                               init_values=init_values, mlp_layer=mlp_layer, norm_eps=norm_eps)
        self.attn_for = attn_factory(attn_layer)

        # tokenizer: images -> tokens with their boxes; timm's key `patch_embed` for every kind
        self.patch_embed = self._build_tokenizer(tokenizer, img_size, patch_size, in_chans, embed_dim, tokens,
                                                 quadtree_sizes, quadtree_score, split_threshold, budget_step)
        # positions: a learned row per grid cell (fixed layouts); for quadtree leaves, by `leaf_pos`
        fixed = self.patch_embed.fixed_layout
        self.leaf_positions = None if fixed else LeafPositions(leaf_pos, self.patch_embed.sizes, img_size)
        rows = self.patch_embed.num_tokens if fixed else self.leaf_positions.table_rows(self.patch_embed.num_tokens)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, rows + self.num_prefix_tokens, embed_dim))
        sizes = 0 if fixed else self.leaf_positions.size_classes()
        self.size_embed = nn.Embedding(sizes, embed_dim) if sizes else None
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

        self.blocks = self._build_blocks(depth)
        self.num_features = self._num_features()

        # head: timm's layout: final norm before pooling for the cls token, after pooling (fc_norm) for the mean
        self.norm = LayerNorm(self.num_features, norm_eps) if global_pool == "token" else nn.Identity()
        self.fc_norm = LayerNorm(self.num_features, norm_eps) if global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.readout = self._build_head(head, img_size)
        outputs = self.readout.outputs(num_classes)
        self.head = nn.Linear(self.num_features, outputs) if num_classes > 0 else nn.Identity()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.init_weights()

    # -- construction hooks ----------------------------------------------------------------------------
    def _build_tokenizer(self, tokenizer, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                         tokens: int | None, quadtree_sizes: tuple[int, int] | None, score: str,
                         threshold: float | None = None, budget_step: int = 4) -> Tokenizer:
        if callable(tokenizer):
            return tokenizer(img_size, patch_size, in_chans, embed_dim)
        _choose("tokenizer", tokenizer, TOKENIZERS)
        if tokenizer != "quadtree":
            try:
                return PATCH_EMBEDS[tokenizer](img_size, patch_size, in_chans, embed_dim)
            except ValueError as exc:
                raise VitlabError(str(exc)) from None
        if embed_dim % 4:
            raise VitlabError(f"model.tokenizer=quadtree places leaves by a 2-D sinusoidal code, which needs "
                              f"embed_dim divisible by 4, got {embed_dim}")
        root, smallest = quadtree_sizes or (4 * patch_size, patch_size)
        return QuadtreeTokenizer(img_size, patch_size, in_chans, embed_dim, tokens, root, smallest, score,
                                 threshold, budget_step)

    def _build_head(self, head: str, img_size: int) -> nn.Module:
        """What the tokens become (the Linear `head` after it is sized by it)."""
        if head == "segment":
            return SegmentHead(self.num_prefix_tokens, self.patch_embed.patch_size, self.patch_embed.sizes,
                               img_size)
        return ClassifierHead(self.global_pool, self.num_prefix_tokens)

    def _build_block(self, index: int, dim: int, num_heads: int, drop_path: float) -> Block:
        return Block(dim, num_heads, drop_path=drop_path, attn_layer=self.attn_for(index), **self.block_args)

    def _build_blocks(self, depth: int) -> nn.Sequential:
        """The block stack (the staged ViT builds stages of growing width here)."""
        rates = drop_path_rates(self.drop_path_rate, depth)
        return nn.Sequential(*[self._build_block(i, self.embed_dim, self.num_heads, rates[i]) for i in range(depth)])

    def _num_features(self) -> int:
        """Width of the tokens `forward_features` returns (two streams: twice the embedding width)."""
        return self.embed_dim

    @property
    def tokenizer(self) -> Tokenizer:
        return self.patch_embed

    @property
    def architecture(self) -> str:
        """What the model is, the one name reports, results and run layouts use: 'vit', 'rev_vit', 'pit_vit',
        ..., with 'diff_' / 'diff2_' in front under differential attention V1 / V2 (its registered name is
        `vitlab_name`)."""
        return {"diff": "diff_", "diff2": "diff2_"}.get(self.attn_layer_name, "") + self._kind

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0.02) for embeddings and Linear weights, zero biases (ViT/DeiT practice), LeCun
        normal for the patch projection; the head comes last in module order, so a wider head leaves every
        other weight as the reference's, and a tokenizer's own encoder (a learned tree) comes after that."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.patch_embed.init_weights()
        tokenizer_modules = set(self.patch_embed.modules())
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in tokenizer_modules:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.size_embed is not None:
            nn.init.trunc_normal_(self.size_embed.weight, std=0.02)
        self.patch_embed.init_late()

    @staticmethod
    def upgrade_keys(state: dict) -> dict:
        """State-dict keys (or key -> shape) written by older vitlab versions -> today's; a family that moved
        weights overrides it (checkpoint checks compare files through it)."""
        return state

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer before every training batch; families with schedules that follow training
        (see `vitlab.objective`) override it."""

    def no_weight_decay(self) -> set[str]:
        """Parameters that the optimizer should not decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"} | {f"patch_embed.{n}" for n, _ in self.patch_embed.named_parameters()
                                             if n.endswith(("pos_embed", "cls_token"))}

    # -- forward: tokenizer -> blocks -> head ------------------------------------------------------------
    def tokenize(self, x: torch.Tensor) -> TokenSet | TokenGroups:
        """(B, C, H, W) -> the tokens (B, T, D) and their boxes (grouped by count under per-image budgets)."""
        return self.patch_embed.tokenize(x)

    def embed_tokens(self, t: TokenSet) -> torch.Tensor:
        """[cls; tokens] + positions (B, prefix + T, D)."""
        if isinstance(t, TokenGroups):
            raise VitlabError("with per-image budgets (model.split_threshold) images have different token counts, "
                              "so there is no one (B, T, D) sequence: use forward(x), or leave the threshold unset")
        prefix_pos, slot_pos = self.pos_embed[:, :self.num_prefix_tokens], self.pos_embed[:, self.num_prefix_tokens:]
        where = slot_pos if self.leaf_positions is None else self.leaf_positions.encode(slot_pos, self.size_embed, t)
        x = t.tokens + where
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + prefix_pos).expand(len(x), -1, -1), x], dim=1)  # (B, 1+T, D)
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> [cls; tokens] + positions (B, prefix + T, D)."""
        return self.embed_tokens(self.tokenize(x))

    def new_merging(self, x: torch.Tensor, first_block: int = 0) -> TokenMerging | None:
        """Token-merging state for tokens x (B, N, D) entering block `first_block`, or None without `merge`."""
        schedule = self.merge[first_block:]
        if not any(schedule):
            return None
        return TokenMerging(schedule, x.shape[1], self.num_prefix_tokens, self.merge_prop_attn)

    def iter_blocks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each block's output tokens in turn (what `forward_intermediates` probes), in the input's layout
        (merged tokens are given back to each token they stand for)."""
        merging = self.new_merging(x)
        for block in self.blocks:
            x = block(x, merging)
            yield x if merging is None else merging.unmerge(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        merging = self.new_merging(x)
        if merging is None:
            return self.blocks(x)
        for block in self.blocks:
            x = block(x, merging)  # (B, N_k, D), N_k = N - r_1 - ... - r_k
        return merging.unmerge(x)  # (B, N, D): the head reads the layout it was built for

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + T, num_features)."""
        return self.norm(self.forward_blocks(self.embed(x)))

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False, tokens: TokenSet | None = None) -> torch.Tensor:
        """Normalised tokens -> logits (B, classes) or, with the segmentation head, per-pixel logits
        (B, classes, H, W) painted from `tokens`' boxes; with `pre_logits`, the pooled, normalised features
        (timm's signature: `forward_head(x, pre_logits)`)."""
        y = self.head_drop(self.fc_norm(self.readout.pool(z)))
        return y if pre_logits else self.readout.decode(self.head(y), tokens)

    def forward_tokens(self, tokens: TokenSet) -> torch.Tensor:
        """Tokens -> positions and class token -> blocks -> head."""
        return self.forward_head(self.norm(self.forward_blocks(self.embed_tokens(tokens))), tokens=tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenize(x)
        if isinstance(tokens, TokenGroups):  # per-image budgets: each group of equal counts as a dense batch
            return tokens.map(self.forward_tokens)
        return self.forward_tokens(tokens)

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
