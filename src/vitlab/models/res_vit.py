"""Res-ViT: per-token, per-layer routing with low-rank residual approximators (the Res-ViT project's `res-vit/`).

Layers l < s0 are the reference blocks. From s0 on, layers form blocks of b; a router at each block's first
layer gives every token b keep bits w_j (Gumbel straight-through in training, argmax in eval; the first R
tokens, the class token, always run). With F the full pre-norm layer and U D the approximator keyed by the
token's pattern (or its inactive run), layer j of a block is

    x' = w_j F(x) + (1 - w_j) x + e_j U D x,     e_j = (1 - w_j) * (w_{j+1} if j < b - 1 else 1)

so a skipped run passes its tokens through and adds one low-rank correction at the run's last layer (e_j
marks it). With `router_grad: ste` the task gradient reaches the router through w (upstream mixes with a
boolean and the router learns from the ratio loss alone: `router_grad: none`).

Inference decisions (`eval_routing`): `topk` keeps each layer's `capacity` (default: the target ratio) most
likely tokens per image, so inference runs at the ratio training targeted; `threshold` keeps tokens with
p_keep > 1/2 (the original's argmax), which can keep far more: the ratio loss constrains the mean probability,
and a router at p = 0.6 everywhere meets a 0.6 target in training and keeps every token at inference.
Training decisions (`train_routing`): `sample` draws each bit by Gumbel-softmax (the original); `topk` keeps
each image's capacity (from the current target) tokens of highest Gumbel-perturbed margin, straight-through:
training then sees the per-image budget top-k inference applies, and the ratio holds by construction (the
default: on MNIST-on-canvas at 0.5 it gave 79.0% against 77.0% for `sample`, bench/RESULTS.md).

Execution (`execution`, inference; training always computes F for every token, which the straight-through
gradient of a skipped token needs):
    mask  F on all tokens, then the mix above (the reference);
    skip  queries, output projection and MLP on the active tokens only (gathered; under `threshold` padded to
          the batch's largest count), keys and values over all tokens: equal to `mask`, at (2 + 10a) N D^2 + 2a N^2 D
          multiply-adds instead of 12 N D^2 + 2 N^2 D;
    mod   Mixture-of-Depths: a fixed capacity of tokens by keep probability; the others are also dropped
          from keys and values (12a N D^2 + 2a^2 N^2 D; static shapes).

Losses (the objective protocol): lambda_active * ratio loss (MSE of the mean soft keep probability against
the target, or L1 of the hard ratio over all layers), lambda_distill * distillation (the class token against
the same network run with every token active, detached, or layer-local on the approximated tokens), and
-lambda_entropy * router entropy. The target decays from 1 to `active_target` on a cosine over training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VitlabError
from ..layers.block import Block
from ..layers.lora import linear_rows
from ..layers.router import LowRankApproximators, TokenRouter
from ..objective import ModelOutput
from .vit import VisionTransformer
from .sizes import register_sizes


def run_end(bits: torch.Tensor, j: int) -> torch.Tensor:
    """e_j: 1 where layer j is the last layer of an inactive run. bits (..., b) in {0, 1}, differentiable."""
    end = 1.0 - bits[..., j]
    return end * bits[..., j + 1] if j + 1 < bits.shape[-1] else end


def pattern_id(bits: torch.Tensor) -> torch.Tensor:
    """sum_j bit_j 2^(b-1-j): the integer of a token's keep pattern, (..., b) -> (...) long."""
    b = bits.shape[-1]
    weights = 2 ** torch.arange(b - 1, -1, -1, device=bits.device)
    return (bits.detach().round().long() * weights).sum(-1)


def run_start(bits: torch.Tensor, j: int) -> torch.Tensor:
    """The first layer of the inactive run that covers layer j (j where layer j is active)."""
    start = torch.full(bits.shape[:-1], j, dtype=torch.long, device=bits.device)
    inactive = bits[..., j].detach() < 0.5
    for i in range(j - 1, -1, -1):  # over the b <= 4 layers of a block, not over tokens
        inactive = inactive & (bits[..., i].detach() < 0.5)
        start = torch.where(inactive, i, start)
    return start


def _active_first(active: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count) of each row's active tokens first, each group in token order."""
    return torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :count]


def flat_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Token indices (B, K) of a (B, n, D) tensor -> row indices (B*K,) of its (B*n, D) view. Whole rows move
    with index_select / index_copy_ at several times the speed of gather / scatter_ with an index expanded over
    D, which reads one int64 per element."""
    return (rows + n * torch.arange(rows.shape[0], device=rows.device)[:, None]).flatten()


def take_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(B, n, D) -> (B, K, D): the tokens `flat` (from flat_rows) names, in order."""
    return x.reshape(-1, x.shape[-1]).index_select(0, flat).view(x.shape[0], -1, x.shape[-1])


def put_rows_(out: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write rows (B, K, D) into the contiguous out (B, n, D) at `flat`, in place; returns out."""
    out.view(-1, out.shape[-1]).index_copy_(0, flat, rows.reshape(-1, rows.shape[-1]))
    return out


def cosine_target(step: int, total: int, target: float) -> float:
    """rho_t = rho* + (1 - rho*) (1 + cos(pi t / T)) / 2: 1 at t = 0, rho* from t = T on."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class _Trace:
    """What one forward collects for the losses and metrics."""
    margins: list[torch.Tensor] = field(default_factory=list)  # keep-minus-skip logits per router (B, N, b)
    bits: list[torch.Tensor] = field(default_factory=list)  # keep bits per dynamic layer (B, N)
    distill: list[torch.Tensor] = field(default_factory=list)


class ResViT(VisionTransformer):
    _kind = "resvit"
    merges_tokens = False  # its routers already choose which tokens each layer runs
    # GFLOPs in run logs and `vitlab models` are the full model's (every token active): counted on the meta
    # device, where data-dependent routing cannot run. Measured FLOPs of routed inference: bench/resvit.py.
    static_flops_args = {**VisionTransformer.static_flops_args, "execution": "mask", "routing": "learned"}
    new_parameter_prefixes = ("routers.", "approximators.")  # what a plain ViT checkpoint cannot provide

    def __init__(self, *args: Any, dynamic_start_layer: int = 2, block_size: int = 1, reserve_initials: int = 1,
                 router_hdim: int = 512, router_keep_bias: float = 5.0, low_rank_dim: int = 256,
                 approx_key: Literal["pid", "run"] = "pid", routing: Literal["learned", "random"] = "learned",
                 router_grad: Literal["ste", "none"] = "ste", gumbel_noise: bool = True,
                 train_routing: Literal["sample", "topk"] = "topk",
                 execution: Literal["mask", "skip", "mod"] = "skip",
                 eval_routing: Literal["topk", "threshold"] = "topk", capacity: float | None = None,
                 active_target: float = 0.6, target_schedule: Literal["cosine", "const"] = "cosine",
                 active_loss: Literal["mse_soft", "l1_hard"] = "mse_soft",
                 distill: Literal["cls_teacher", "layer_local", "none"] = "cls_teacher",
                 lambda_active: float = 1e-4, lambda_distill: float = 0.01, lambda_entropy: float = 0.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        depth, s0, b = len(self.blocks), dynamic_start_layer, block_size
        if not 1 <= b <= 4:
            raise VitlabError(f"model.block_size must be 1 to 4, got {b}")
        if not 0 <= s0 <= depth or (depth - s0) % b:
            raise VitlabError(f"model.dynamic_start_layer={s0} leaves {depth - s0} dynamic layers of {depth}, not a "
                              f"multiple of model.block_size={b}; change one of them")
        if not 0.0 < active_target <= 1.0:
            raise VitlabError(f"model.active_target must be in (0, 1], got {active_target}")
        if execution != "mask" and self.attn_layer_name != "mhsa":
            raise VitlabError(f"model.execution={execution} needs standard attention (attn_layer=mhsa); "
                              f"use model.execution=mask with attn_layer={self.attn_layer_name}")
        self.s0, self.b, self.reserved = s0, b, reserve_initials
        self.approx_key, self.routing, self.router_grad = approx_key, routing, router_grad
        self.gumbel_noise, self.train_routing = gumbel_noise, train_routing
        self.execution, self.eval_routing = execution, eval_routing
        self.capacity = capacity
        self.active_target, self.target_schedule, self.active_loss = active_target, target_schedule, active_loss
        self.distill, self.lambdas = distill, (lambda_active, lambda_distill, lambda_entropy)
        self.target = active_target  # the current ratio target; set_progress moves it during training
        # Built after the reference weights are initialised, so those are the ViT's at the same seed.
        n_blocks = (depth - s0) // b
        count = 2 ** b - 1 if approx_key == "pid" else b * (b + 1) // 2
        self.routers = nn.ModuleList(TokenRouter(self.embed_dim, router_hdim, b, reserve_initials, router_keep_bias)
                                     for _ in range(n_blocks))
        self.approximators = nn.ModuleList(LowRankApproximators(self.embed_dim, low_rank_dim, count)
                                           for _ in range(n_blocks))
        # approx_key=run: inactive run (first layer i, last layer j) -> its approximator's index
        runs = [(i, j) for i in range(b) for j in range(i, b)]
        self.register_buffer("run_index", torch.tensor([[runs.index((i, j)) if j >= i else 0 for j in range(b)]
                                                        for i in range(b)]), persistent=False)

    # -- schedule ------------------------------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        self.target = (cosine_target(step, total_steps, self.active_target) if self.target_schedule == "cosine"
                       else self.active_target)

    # -- routing -------------------------------------------------------------------------------------------
    def _route(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keep bits (B, N, b), straight-through in training; keep-minus-skip logits (B, N, b); under top-k
        decisions the kept tokens' indices (B, capacity, b), else None."""
        logits = self.routers[k](x)  # (B, N, b, 2)
        margin = logits[..., 1] - logits[..., 0]
        prob = torch.sigmoid(margin)  # = softmax(logits)[..., 1]
        top = None
        if self.routing == "random":  # the baseline: Bernoulli(target) per token and layer
            bits = (torch.rand(prob.shape, device=x.device) < self.target).to(x.dtype)
        elif self.training and self.train_routing == "topk":  # the budget inference will have, per image
            noise = torch.logit(torch.rand_like(margin)) if self.gumbel_noise else 0.0  # Gumbel - Gumbel: logistic
            hard, _ = self._topk(margin + noise)
            bits = hard + prob - prob.detach()
        elif self.training and self.gumbel_noise:
            bits = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 1]
        elif self.training:  # deterministic, still straight-through
            hard = (logits[..., 1] > logits[..., 0]).to(x.dtype)
            bits = hard + prob - prob.detach()
        elif self.execution == "mod" or self.eval_routing == "topk":  # the most likely `capacity` tokens
            bits, top = self._topk(margin)
        else:
            bits = (logits[..., 1] > logits[..., 0]).to(x.dtype)
        bits = torch.cat([torch.ones_like(bits[:, :self.reserved]), bits[:, self.reserved:]], dim=1)
        return (bits if self.router_grad == "ste" else bits.detach()), margin, top

    def _topk(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits (B, N, b) of each image's `capacity` highest-scoring tokens, and their indices (B, C, b) with
        the reserved tokens first."""
        score = torch.cat([torch.full_like(score[:, :self.reserved], math.inf), score[:, self.reserved:]], 1)
        top = score.topk(self._capacity(score.shape[1]), dim=1).indices
        return torch.zeros_like(score).scatter_(1, top, 1.0), top

    def _approx_keys(self, bits: torch.Tensor, j: int) -> torch.Tensor:
        if self.approx_key == "pid":  # all-ones (2^b - 1) never ends a run; clamp keeps the gather in range
            return pattern_id(bits).clamp(max=2 ** self.b - 2)
        return self.run_index[run_start(bits, j), j]

    # -- one dynamic layer -------------------------------------------------------------------------------
    def _partial(self, block: Block, x: torch.Tensor, xq: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The layer's output for the gathered tokens xq = take_rows(x, flat) (B, K, D): their queries, every
        token's keys and values."""
        attn = block.attn
        h = block.norm1(x)
        heads = lambda t: t.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)  # noqa: E731 (B,H,T,d)
        q = heads(linear_rows(attn.qkv, take_rows(h, flat), range(0, 1), 3))  # queries of the active tokens only
        k, v = map(heads, linear_rows(attn.qkv, h, range(1, 3), 3).chunk(2, dim=-1))  # every token's keys, values
        out = attn.attend(q, k, v).transpose(1, 2).flatten(2)  # (B, K, D)
        xq = xq + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
        return xq + block.mlp_residual(xq)

    def _layer(self, block: Block, x: torch.Tensor, w: torch.Tensor, end: torch.Tensor,
               approximator: LowRankApproximators, keys: torch.Tensor,
               rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w F(x) + (1 - w) x + end A(x), the full layer's output F(x) when it was computed), A the run's
        approximator. rows (B, K): the kept tokens when top-k decided them (exactly K per image), else None."""
        if self.training or self.execution == "mask":
            y = block(x)
            keep = w[..., None]
            return keep * y + (1.0 - keep) * x + end[..., None] * approximator(x, keys), y
        active, N = w > 0.5, x.shape[1]  # (B, N)
        out = approximator.add_to(x, keys, end)  # the skipped tokens' output; kept tokens' rows are overwritten
        if self.execution == "mod":  # attention among the kept tokens only, at a fixed capacity
            if rows is None:  # random routing: its active tokens first, filled up to capacity
                rows = _active_first(active, self._capacity(N))
            flat = flat_rows(rows, N)
            return put_rows_(out, flat, block(take_rows(x, flat))), None
        if rows is not None:  # exactly the kept tokens: no sort, no padding
            flat = flat_rows(rows, N)
            return put_rows_(out, flat, self._partial(block, x, take_rows(x, flat), flat)), None
        # p > 1/2 decisions or random routing: pad to the batch's largest count (one host sync per layer)
        count = int(active.sum(1).max())
        if count == 0:
            return out, None
        rows = _active_first(active, count)  # (B, K)
        flat = flat_rows(rows, N)
        new = torch.where(active.gather(1, rows)[..., None], self._partial(block, x, take_rows(x, flat), flat),
                          take_rows(out, flat))  # padding rows keep their skipped output
        return put_rows_(out, flat, new), None

    def _capacity(self, n: int) -> int:
        """Tokens each layer keeps under top-k routing (eval, or mod), the reserved ones included."""
        return min(n, self.reserved + math.ceil((self.capacity or self.target) * (n - self.reserved)))

    # -- the stack -----------------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, trace: _Trace) -> Iterator[torch.Tensor]:
        teacher = None
        for l, block in enumerate(self.blocks):
            if l < self.s0:
                x = block(x)
                yield x
                continue
            k, j = divmod(l - self.s0, self.b)
            if j == 0:
                bits, margin, top = self._route(k, x)
                trace.margins.append(margin)
                if self.training and self.distill == "cls_teacher" and teacher is None:
                    teacher = x.detach()
            w, end = bits[..., j], run_end(bits, j)
            x, full = self._layer(block, x, w, end, self.approximators[k], self._approx_keys(bits, j),
                                  None if top is None else top[..., j])
            trace.bits.append(w)
            if teacher is not None:  # the same network with every token active, detached
                with torch.no_grad():
                    teacher = block(teacher)
                trace.distill.append(F.mse_loss(x[:, 0], teacher[:, 0]))
            elif self.training and self.distill == "layer_local":
                on = end.detach()[..., None]  # tokens that got an approximator, against the layer they skipped
                err = F.smooth_l1_loss(x, full.detach(), reduction="none") * on
                trace.distill.append(err.sum() / (on.sum() * x.shape[-1]).clamp(min=1.0))
            yield x

    def iter_blocks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        yield from self._layers(x, _Trace())

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for x in self.iter_blocks(x):
            pass
        return x

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, _Trace]:
        trace, tokens = _Trace(), self.tokenize(x)
        for h in self._layers(self.embed_tokens(tokens), trace):
            pass
        return self.forward_head(self.norm(h), tokens=tokens), trace

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, keep bits (B, dynamic layers, tokens) as bool): which tokens ran in each dynamic layer."""
        logits, trace = self._run(x)
        return logits, torch.stack(trace.bits, 1) > 0.5 if trace.bits else torch.zeros(0, dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        logits, trace = self._run(x)
        if not self.training or not trace.bits:
            return logits
        return ModelOutput(logits, *self._objective(trace))

    def _objective(self, trace: _Trace) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        lambda_active, lambda_distill, lambda_entropy = self.lambdas
        R, depth = self.reserved, len(self.blocks)
        margin = torch.cat([m[:, R:] for m in trace.margins], dim=-1)  # (B, N - R, dynamic layers)
        prob = torch.sigmoid(margin)
        hard = torch.stack([w[:, R:] for w in trace.bits], dim=-1)  # (B, N - R, dynamic layers)
        ratio_all = (hard.sum(-1) + self.s0) / depth  # static layers always run
        if self.active_loss == "mse_soft":
            active = (prob.mean() - self.target) ** 2
        else:
            active = (ratio_all.mean() - self.target).abs()
        entropy = (F.softplus(margin) - prob * margin).mean()  # Bernoulli entropy, stable for saturated routers
        losses = {"active": lambda_active * active}
        if trace.distill:
            losses["distill"] = lambda_distill * torch.stack(trace.distill).sum()
        if lambda_entropy:
            losses["entropy"] = -lambda_entropy * entropy
        metrics = {"active_dynamic": hard.detach().mean(), "active_all": ratio_all.detach().mean(),
                   "target": hard.new_tensor(self.target), "router_entropy": entropy.detach()}
        return losses, metrics


register_sizes("resvit", ResViT)
