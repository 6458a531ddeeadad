#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine each takes cores/N threads, backend gloo).
#   scripts/torchrun.sh 4 --config configs/vit_b16_cifar10.yaml --data_dir /data
# train.batch_size is per process: the global batch is batch_size x N x train.accum_steps.
set -euo pipefail
NPROC="${1:?usage: scripts/torchrun.sh NPROC [vitlab train arguments...]}"
shift
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
# --standalone: a local rendezvous on a free port, so several jobs can share the node.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m vitlab train "$@"
