"""GDT-ViT: the reference ViT with the learned quadtree tokenizer (`layers/learned_quadtree.py`).

A Gumbel top-k selector, one small transformer per tree level, learns which patches to split; the leaves,
resized to `patch_size`, are the ViT's tokens. The downstream ViT (our blocks) sees [cls; leaves] with
`leaf_pos`: `seq`, a learned table by sequence position (the original); `coords`, the sinusoidal encoding of
each leaf's corner plus an embedding of its size; or `grid`, a learned grid of the finest leaves' positions
averaged over each leaf's box, plus the size embedding.

Fixed from the original (ROUTED_AND_ADAPTIVE.md A.4): no noise at inference (`eval_gumbel` restores it);
selections sorted; the plan checked at construction (the slot scorer needs N_s = max_seq_len); timm blocks
instead of a 12 GiB relative-index buffer; the configured depth and heads honoured; leaf coordinates usable.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from ..layers.learned_quadtree import LearnedQuadtreeTokenizer, Tree
from ..registry import register_model
from .vit import VisionTransformer


class GDTViT(VisionTransformer):
    _kind = "gdt_vit"
    derived_arguments = ("tokenizer", "tokens", "quadtree_sizes", "quadtree_score")  # the tree is learned
    # What a checkpoint without a learned tree (a plain ViT's, or a `scorer=heuristic` run's) cannot provide: the
    # tree starts fresh on a trained classifier (`model.pretrained`), the literature's "start from a trained model".
    new_parameter_prefixes = ("patch_embed.stages.",)

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 stages: Sequence[tuple[int, int, float]] = ((32, 16, 0.25), (16, 8, 0.25), (8, 4, 0.25),
                                                             (4, 2, 0.25)),
                 stage_depth: int = 4, max_seq_len: Sequence[int] | None = None,
                 scorer: Literal["slot", "token", "prior", "heuristic", "random"] = "slot",
                 stage_encoder: Literal["vit", "torch"] = "vit",
                 leaf_pos: Literal["seq", "coords", "grid"] = "seq",
                 eval_gumbel: bool = False, tau: float = 1.0, antialias: bool = False, prior_scale: float = 1.0,
                 noise_scale: float = 1.0, leaf_order: Literal["tree", "raster"] = "tree",
                 estimator: Literal["scale", "detail"] = "scale", prior_context: float = 0.0, **kwargs: Any):
        """patch_size: the size t every leaf is resized to (the original's target_leaf_size);
        stages: (patch_in, patch_out, ratio) per level; max_seq_len: the original's per-stage M, checked
        against the plan; stage_encoder: `vit` (our pre-norm blocks) or `torch` (the original's layers);
        scorer: `slot` (the original), `token`, `prior` (the content heuristic's standardised edge score times a
        learned `prior_scale`, plus the token scorer's logit, which starts at zero), `heuristic` (the prior
        alone, nothing learned) or `random`; noise_scale: the training Gumbel noise's scale; leaf_order: `tree`
        (the original) or `raster` (each leaf size in raster order, the content quadtree's); estimator: `scale`
        (the original: the straight-through gate scales the split patch's pixels) or `detail` (it scales only
        the detail the split adds over the unsplit leaf's view); prior_context: c x the 3 x 3 neighbourhood's
        mean edge score added to the prior's (ties among flat cells go next to the content)."""
        def tokenizer(*grid_args: Any) -> LearnedQuadtreeTokenizer:  # called by the ViT once its settings are set
            return LearnedQuadtreeTokenizer(
                *grid_args, stages=stages, stage_depth=stage_depth,
                make_block=lambda i: self._build_block(i, embed_dim, self.num_heads, 0.0),
                num_heads=self.num_heads, mlp_ratio=self.block_args["mlp_ratio"], norm_eps=self.norm_eps,
                max_seq_len=max_seq_len, scorer=scorer, stage_encoder=stage_encoder, eval_gumbel=eval_gumbel,
                tau=tau, antialias=antialias, prior_scale=prior_scale, noise_scale=noise_scale,
                leaf_order=leaf_order, estimator=estimator, prior_context=prior_context)

        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         leaf_pos=leaf_pos, tokenizer=tokenizer, **kwargs)
        self.token_plan = self.patch_embed.plan
        self._register_load_state_dict_pre_hook(self._upgrade_on_load)  # the private name exists on torch 2.4

    @staticmethod
    def upgrade_keys(state: dict) -> dict:
        """Checkpoints from before the tokenizer owned the tree kept its stages at the model's top level."""
        return {("patch_embed." + k if k.startswith("stages.") else k): v for k, v in state.items()}

    def _upgrade_on_load(self, state_dict: dict, prefix: str, *args: Any) -> None:
        old = [k for k in state_dict if k.startswith(prefix + "stages.")]
        moved = {k[len(prefix):]: state_dict.pop(k) for k in old}
        state_dict.update({prefix + k: v for k, v in self.upgrade_keys(moved).items()})

    def grow(self, x: torch.Tensor) -> Tree:
        """Each image's quadtree: leaves, selections and gates (for plots and tests)."""
        return self.patch_embed.grow(x)

    def forward_with_tree(self, x: torch.Tensor) -> tuple[torch.Tensor, Tree]:
        """(logits, the quadtree the tokens came from)."""
        tokens = self.tokenize(x)
        return self.forward_head(self.norm(self.forward_blocks(self.embed_tokens(tokens))), tokens=tokens), tokens.tree




def _register() -> None:
    # the original's default (configs/gdt_vit.yaml): 4 stages 32 -> 2 px at ratio 0.25, 4 layers each; a
    # 6-block classifier over 256 leaves resized to 16 px
    register_model("gdt_vit_base_256", GDTViT, img_size=256, patch_size=16, embed_dim=768,
                   depth=6, num_heads=12, stage_depth=4, num_classes=1000, qkv_bias=False, norm_eps=1e-5,
                   stage_encoder="torch")
    # CPU scale (A.6): a 64 px canvas, 16 -> 8 -> 4 px, 12 + 8 + 32 = 52 tokens of 4 px
    register_model("gdt_vit_tiny_64", GDTViT, img_size=64, patch_size=4, embed_dim=64,
                   depth=4, num_heads=4, stages=[[16, 8, 0.25], [8, 4, 0.5]], stage_depth=1, num_classes=10)


_register()
