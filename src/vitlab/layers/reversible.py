"""Memory-efficient backpropagation through invertible block stacks: the machinery the reversible, BDIA and
momentum ViTs share, so that each family file holds only its update rule.

A family describes step k of its stack (block k) as two functions on a tuple of state tensors,

    step(k, state, p) -> next state            inverse(k, next state, p) -> state

that evaluate their residual branches (a block, or half of one) through `p.branch(j, fn, x)`, j numbering the
branches of the step. `InvertibleStack` then runs the stack one of two ways:

- plain: the steps in order under autograd (eval, no_grad, or `memory_efficient=False` for tests);
- memory-efficient: one autograd Function per step, run without a graph; only the last state is kept. The
  backward of step k rebuilds the step's input with `inverse` (evaluating each branch under autograd on a
  detached copy of its input), replays `step` from the rebuilt input with those branch outputs grafted in
  (no third evaluation), and takes one `autograd.grad` for the step's input and block parameters. The block's
  parameter gradients go back to autograd from that step's backward, so they land in `.grad` (and DDP's
  hooks fire) block by block; nothing holds the whole stack's gradients at once.

Randomness: one integer seed is drawn per training pass; branch j of step k runs on the random stream seeded
by seed + 4k + j, so dropout and drop-path draws replay exactly in the backward from O(1) state, and the
global stream advances by one draw per pass. Models without randomness skip the stream forks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

State = tuple[torch.Tensor, ...]
Branch = Callable[[torch.Tensor], torch.Tensor]
BRANCHES_PER_STEP = 4  # seed stride between steps; a step may have up to this many branches


@contextmanager
def branch_rng(seed: int | None, index: int, device: torch.device) -> Iterator[None]:
    """Run a branch on the random stream seeded by seed + index, leaving the global stream untouched;
    `seed=None`: nothing random to replay, run as is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + index)
        yield


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether running `module` in its current mode draws random numbers (dropout, drop-path, attention
    dropout)."""
    rates = (getattr(m, key, 0) for m in module.modules() for key in ("p", "attn_drop"))
    return module.training and any(isinstance(r, float) and r > 0 for r in rates)


def trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


class Pass:
    """What one forward pass shares with its backward: the seed, whether branches replay random draws, and
    side information a family stores per step (`side`, e.g. BDIA's packed bits) or per pass (`memo`)."""

    def __init__(self, seed: int | None, replay: bool):
        self.seed, self.replay = seed, replay
        self.side: dict[int, Any] = {}
        self.memo: dict[str, Any] = {}
        self.step = 0
        self.branch_hook: Callable[[int, Branch, torch.Tensor], torch.Tensor] | None = None

    def branch(self, j: int, fn: Branch, x: torch.Tensor) -> torch.Tensor:
        """fn(x) for branch j of the current step, with its own random stream."""
        if self.branch_hook is not None:
            return self.branch_hook(j, fn, x)
        return self.run(j, fn, x)

    def run(self, j: int, fn: Branch, x: torch.Tensor) -> torch.Tensor:
        with branch_rng(self.seed if self.replay else None, BRANCHES_PER_STEP * self.step + j, x.device):
            return fn(x)


class _Graft(torch.autograd.Function):
    """Value `out` (a branch output computed during the inverse, with its own graph from `leaf`), attached
    to the replay's branch input `x`: the backward pulls the incoming gradient through that graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, record: tuple) -> torch.Tensor:
        ctx.record = record
        return record[1].detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        leaf, out, params, param_grads = ctx.record
        dx, *dparams = torch.autograd.grad(out, [leaf, *params], grad, allow_unused=True)
        for i, g in enumerate(dparams):
            if g is not None:
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
        return dx, None


def _step_backward(stack: "InvertibleStack", k: int, p: Pass, y: State, dy: Sequence[torch.Tensor | None],
                   params: list[torch.Tensor]) -> tuple[State, tuple, list]:
    """(rebuilt input x_k, dL/dx_k, dL/dparams) from step k's output y and its gradient dy."""
    p.step = k
    cache: dict[int, tuple] = {}
    param_grads: list[torch.Tensor | None] = [None] * len(params)

    def evaluate_with_graph(j: int, fn: Branch, x: torch.Tensor) -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = p.run(j, fn, leaf)
        cache[j] = (leaf, out, params, param_grads)
        return out.detach()

    def grafted(j: int, fn: Branch, x: torch.Tensor) -> torch.Tensor:
        return _Graft.apply(x, cache[j]) if j in cache else p.run(j, fn, x)

    p.branch_hook = evaluate_with_graph
    with torch.no_grad():
        x = stack.inverse(k, y, p)
    leaves = tuple(t.detach().requires_grad_(True) for t in x)
    p.branch_hook = grafted
    with torch.enable_grad():
        y_again = stack.step(k, leaves, p)
    p.branch_hook = None
    used = [(a, g) for a, g in zip(y_again, dy) if g is not None and a.requires_grad]
    grads = torch.autograd.grad([a for a, _ in used], [*leaves, *params], [g for _, g in used], allow_unused=True)
    dx, direct = grads[:len(leaves)], grads[len(leaves):]
    dparams = [a if b is None else b if a is None else a + b for a, b in zip(direct, param_grads)]
    return tuple(t.detach() for t in x), dx, dparams


class _Step(torch.autograd.Function):
    """One step of the memory-efficient stack: runs without a graph and saves nothing; its backward gets
    the step's output values from the step after it (or, for the last, from the forward) through `p`."""

    @staticmethod
    def forward(ctx: Any, stack: "InvertibleStack", k: int, p: Pass, n_state: int, *tensors: torch.Tensor):
        state, params = tensors[:n_state], list(tensors[n_state:])
        p.step = k
        with torch.no_grad():
            out = stack.step(k, state, p)
        if k == len(stack.blocks) - 1:
            p.memo["output"] = tuple(t.detach() for t in out)
        ctx.stack, ctx.k, ctx.p, ctx.params = stack, k, p, params
        return out

    @staticmethod
    def backward(ctx: Any, *dy: torch.Tensor):
        p = ctx.p
        x, dx, dparams = _step_backward(ctx.stack, ctx.k, p, p.memo.pop("output"), dy, ctx.params)
        p.memo["output"] = x  # the input of step k is the output of step k - 1
        if ctx.stack.trace is not None:
            ctx.stack.trace.append(x)
        return (None, None, None, None, *dx, *dparams)


class InvertibleStack:
    """Mixin for a ViT whose blocks form an invertible stack. A family defines `initial_state`, `step`,
    `inverse` and `features` (state -> tokens); this class runs the stack plainly or memory-efficiently,
    draws the per-pass seed and declares that FSDP cannot shard it (the backward runs the blocks outside
    FSDP's hooks)."""

    fsdp_compatible = False
    merges_tokens = False  # a merge cannot be inverted: the backward could not rebuild the block's input
    draws_per_pass = False  # True: the update rule itself is random in training (BDIA's gammas)

    def __init__(self, *args: Any, memory_efficient: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.memory_efficient = memory_efficient  # False: plain autograd through the same steps (tests)
        self.trace: list | None = None  # a list: record each step's input state, forward then rebuilt (tests)

    def initial_state(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, k: int, state: State, p: Pass) -> State:
        raise NotImplementedError

    def inverse(self, k: int, state: State, p: Pass) -> State:
        raise NotImplementedError

    def features(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def new_pass(self) -> Pass:
        replay = draws_random_numbers(self.blocks)
        seed = int(torch.randint(2 ** 62, (1,))) if self.training and (replay or self.draws_per_pass) else None
        return Pass(seed, replay)

    def _record(self, state: State) -> None:
        if self.trace is not None:
            self.trace.append(tuple(t.detach().clone() for t in state))

    def iter_states(self, x: torch.Tensor, p: Pass) -> Iterator[State]:
        state = self.initial_state(x)
        for k in range(len(self.blocks)):
            self._record(state)
            p.step = k
            state = self.step(k, state, p)
            yield state

    def iter_blocks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        p = self.new_pass()
        for state in self.iter_states(x, p):
            yield self.features(state)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        p = self.new_pass()
        if not (self.memory_efficient and torch.is_grad_enabled()):
            for state in self.iter_states(x, p):
                pass
            return self.features(state)
        state = self.initial_state(x)
        for k, block in enumerate(self.blocks):
            self._record(state)
            state = _Step.apply(self, k, p, len(state), *state, *trainable(block))
        return self.features(state)
