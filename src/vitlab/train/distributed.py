"""Data-parallel training on torch.distributed: launcher detection, the process group, wrapping, reductions.

The trainer never asks which launcher started it. `detect()` reads the environment once:

- torchrun (also `srun torchrun`): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- SLURM (`srun vitlab train ...`): SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID,
  the first host of SLURM_JOB_NODELIST as master (`scontrol show hostnames`, else parsed here) and a port
  derived from SLURM_JOB_ID, so every task of a job computes the same address without talking;
- nothing (or `--local`): one process, no process group.

Every helper below is the identity at world size 1, so a laptop run and a 64-GPU run take the same lines of
the trainer. Batch semantics: `train.batch_size` is per device; one optimizer step sees
batch_size x world_size x accum_steps images.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import VitlabError
from ..layers.reversible import InvertibleStack


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `launcher == "none"` means a single process without a group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # none | torchrun | slurm
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None or not value.strip():
        if default is None:
            raise VitlabError(f"environment variable {key} is missing; launch with torchrun or srun")
        return default
    try:
        # SLURM_TASKS_PER_NODE-style values: "4(x2)", and "2(x3),1" when nodes run different counts (the most)
        return max(int(part.split("(")[0]) for part in value.split(","))
    except ValueError:
        raise VitlabError(f"environment variable {key}={value[:40]!r} is not an integer; torchrun and srun set it "
                          f"to one: launch with them, or unset it") from None


_ONE_PROCESS = "or unset them to train in one process (or pass --local)"


def detect(local: bool = False, environ: Mapping[str, str] | None = None) -> DistEnv:
    """The launch this process belongs to; `local=True` (the `--local` flag) forces a single process.

    A launch environment that cannot be one (a rank outside the world, no address to meet at, a port that is
    not one) is one line here, before anything is built or written, never a traceback from torch.distributed
    or a rendezvous that waits for peers who will never come."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or any launcher that speaks its protocol
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        if local:
            return _local_or(local, DistEnv(rank=rank, world_size=world))
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
        if missing:
            raise VitlabError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not, so the processes have nowhere to meet: "
                              f"launch with torchrun (it sets all of them), {_ONE_PROCESS}")
        return _checked(DistEnv(
            rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world), launcher="torchrun",
            master_addr=env["MASTER_ADDR"].strip(), master_port=_int(env, "MASTER_PORT")),
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        rank = _int(env, "SLURM_PROCID")
        if local:
            return _local_or(local, DistEnv(rank=rank, world_size=world))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = env.get("MASTER_ADDR", "").strip()
        if not addr and not nodes and world > 1:
            raise VitlabError(f"SLURM_PROCID and a task count of {world} are set but SLURM_JOB_NODELIST is not, so "
                              f"there is no host to meet at: launch with srun (it sets all of them), set "
                              f"MASTER_ADDR, {_ONE_PROCESS}")
        return _checked(DistEnv(
            rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
            # a job's tasks per node may exceed a smaller step's; the count only shares the CPU threads
            local_world_size=min(world, _int(env, "SLURM_STEP_TASKS_PER_NODE", _int(env, "SLURM_NTASKS_PER_NODE",
                                                                                   world))),
            launcher="slurm", master_addr=addr or _first_host(nodes or "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", slurm_port(env.get("SLURM_JOB_ID", "0")))),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "MASTER_PORT"), "srun")
    return DistEnv()


def _checked(e: DistEnv, names: tuple[str, str, str, str, str], launcher: str) -> DistEnv:
    """`e` if it can be a launch: ranks inside their worlds, a TCP port; else one line naming the variables."""
    rank, world, local_rank, local_world, port = names
    fix = f"launch with {launcher}, which sets them consistently, {_ONE_PROCESS}"
    if e.world_size < 1:
        raise VitlabError(f"{world}={e.world_size}: a job has at least one process; {fix}")
    if not 0 <= e.rank < e.world_size:
        raise VitlabError(f"{rank}={e.rank} is not a rank of {world}={e.world_size} (0 to {e.world_size - 1}); {fix}")
    if not 1 <= e.local_world_size <= e.world_size:
        raise VitlabError(f"{local_world}={e.local_world_size} must be 1 to {world}={e.world_size}; {fix}")
    if not 0 <= e.local_rank < e.local_world_size:
        raise VitlabError(f"{local_rank}={e.local_rank} is not a local rank of {local_world}={e.local_world_size} "
                          f"(0 to {e.local_world_size - 1}); {fix}")
    if not 1 <= e.master_port <= 65535:
        raise VitlabError(f"{port}={e.master_port} is not a TCP port (1 to 65535); {fix}")
    return e


def _first_host(nodelist: str) -> str:
    hosts = slurm_hostnames(nodelist)
    if not hosts:
        raise VitlabError(f"SLURM node list {nodelist[:60]!r} names no host; launch with srun, or set MASTER_ADDR")
    return hosts[0]


def _local_or(local: bool, env: DistEnv) -> DistEnv:
    """`--local` keeps the launch's rank (so extra ranks can step aside) but drops the group."""
    return DistEnv(rank=env.rank, world_size=1, launcher="none") if local else env


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike: 15000-34999, so concurrent jobs on a node rarely collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits[-4:]) % 20000


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list with `scontrol show hostnames` when available, else with `expand_nodelist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5'] (zero padding kept)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) - int(lo) > 100_000:
                raise VitlabError(f"SLURM node list {nodelist[:60]!r} has a range {part[:20]!r} that is not "
                                  f"N or N-M; launch with srun, or set MASTER_ADDR")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def resolve_device(spec: str, env: DistEnv) -> torch.device:
    """`auto`/`cuda` mean this rank's GPU (cuda:LOCAL_RANK), falling back to the CPU only for `auto`."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise VitlabError(f"train.device '{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise VitlabError(f"train.device '{spec}' is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise VitlabError(f"train.device is '{spec}' but this torch has no usable MPS (Apple GPU) device; use "
                          f"train.device=cpu or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitlabError(f"train.device is '{spec}' but no CUDA device is available; use train.device=cpu or auto")
        if device.index is None or env.world_size > 1:
            device = torch.device("cuda", env.local_rank)
        if device.index >= torch.cuda.device_count():
            raise VitlabError(f"local rank {env.local_rank} needs cuda:{device.index} but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible; launch one process per GPU")
        torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_s: float) -> Iterator[str | None]:
    """Initialise the group (NCCL on CUDA, gloo on CPU) for a launched job and always destroy it.

    `timeout_s` bounds every collective: a rank that dies mid-step makes the others fail, not hang."""
    if env.launcher == "none":
        yield None
        return
    if not 0 < timeout_s <= 604800:  # the config's bound (a week); timedelta overflows beyond ~10**14 s
        raise VitlabError(f"train.dist_timeout={timeout_s!r} seconds cannot bound a collective; use 1 to 604800 "
                          f"(the default is 600)")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores (torchrun sets 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT that env:// joins; under SLURM
    # rank 0 opens the store itself.
    url = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(backend, init_method=url, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield backend
        dist.barrier()  # a clean exit: no rank tears its connections down while a peer still talks
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (identity without a group); one collective, no host sync by itself."""
    if active():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
    return fully_shard


def parallelize(model: nn.Module, device: torch.device, strategy: str, compile: bool) -> nn.Module:
    """The module the training loop calls. DDP wraps the model and torch.compile wraps DDP (the order torch's
    DDP notes ask for, so Dynamo splits graphs at DDP's gradient buckets); invertible stacks are compiled
    per block instead (`compile_blocks_regionally`). FSDP2 shards every
    transformer block and then the root, as torchtitan does. `model` itself stays the plain module that
    checkpoints and evaluation use."""
    if strategy == "fsdp":
        if not getattr(model, "fsdp_compatible", True):
            raise VitlabError(f"train.strategy=fsdp cannot shard {type(model).__name__}: its memory-saving backward "
                              f"runs blocks outside FSDP's hooks; use train.strategy=ddp")
        if not (dist.is_available() and dist.is_initialized()):
            raise VitlabError("train.strategy=fsdp shards over a process group; launch with torchrun or srun, "
                              "or use train.strategy=ddp for one process")
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard = _fully_shard()
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise VitlabError(f"train.strategy=fsdp shards per transformer block, but {type(model).__name__} has "
                              f"no `blocks` sequence; use train.strategy=ddp")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    elif dist.is_available() and dist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    if not compile:
        return wrapped
    if isinstance(model, InvertibleStack):
        compile_blocks_regionally(model)
        return wrapped
    return torch.compile(wrapped)


def compile_blocks_regionally(model: nn.Module) -> None:
    """torch.compile each block's attention and MLP in place (parameter names unchanged). An invertible
    stack's memory-saving backward rebuilds activations inside a custom autograd Function with its own
    `autograd.grad` calls, which Dynamo cannot trace as one graph; the branches it evaluates can be, and they
    are where the FLOPs are. Dropout replay holds: a compiled branch draws its random seed from the stream
    the stack forks and re-seeds for each branch."""
    for block in model.blocks:
        block.attn.compile()
        block.mlp.compile()


def no_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that do not end a group."""
    if sync:
        return nullcontext()
    inner = getattr(wrapped, "_orig_mod", wrapped)  # under torch.compile
    if hasattr(inner, "no_sync"):  # DDP
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(inner)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# -- state dicts (plain, DDP or FSDP-sharded) ---------------------------------------------------------------
def _sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # FSDP2 puts this method on sharded modules


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts gathered in full (a collective under FSDP: call it on every rank)."""
    if not _sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    if not _sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
