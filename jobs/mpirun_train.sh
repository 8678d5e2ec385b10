#!/usr/bin/env bash
# Launch `mpimp train` with mpirun (Open MPI or MPICH) on one machine or a host list.
#
#   jobs/mpirun_train.sh                                # 4 ranks, the demo config (pp 2 x tp 2)
#   NP=8 jobs/mpirun_train.sh --dp 2 --pp 2 --tp 2 --batch-size 64
#   HOSTS=node1:4,node2:4 NP=8 jobs/mpirun_train.sh --config jobs/demo.toml --pp 4 --tp 2
#
# Exactly what it runs (extra arguments are appended and override the config file):
#   mpirun -n $NP [--host $HOSTS] --bind-to core -x OMP_NUM_THREADS=1 -x MPIMP_TIMEOUT \
#          .venv/bin/mpimp train --config jobs/demo.toml "$@"
#
# Notes
# * dp x pp x tp must equal NP; --batch-size is the global batch (split over dp, then --chunks).
# * tensor-parallel peers are neighbouring ranks (rank = (dp*pp + pp_rank)*tp + tp_rank): keep a
#   tp group inside one node (ranks are placed by slot, so --host nodeA:4 with tp <= 4 does that).
# * One torch thread per rank (OMP_NUM_THREADS=1); more ranks than cores needs --oversubscribe.
# * A clean stop: `kill -USR1 <mpirun pid>` (mpirun forwards SIGUSR1 to every rank), or SIGTERM /
#   SIGUSR1 / SIGINT to any one rank: every rank stops at the next step boundary and the outputs
#   (metrics, plots, summary, model) are still written.  Ctrl-C on mpirun itself kills the ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-4}
export OMP_NUM_THREADS=1 MPIMP_TIMEOUT=${MPIMP_TIMEOUT:-600}
HOSTARGS=()
if [ -n "${HOSTS:-}" ]; then HOSTARGS=(--host "$HOSTS"); fi
MPIRUN=${MPIRUN:-$(command -v .venv/bin/mpirun || command -v mpirun)}
BIND=${BIND:---bind-to core}
if [ "$NP" -gt "$(nproc)" ] && [ -z "${HOSTS:-}" ]; then BIND="--oversubscribe"; fi
# shellcheck disable=SC2086
exec "$MPIRUN" -n "$NP" "${HOSTARGS[@]}" $BIND -x OMP_NUM_THREADS -x MPIMP_TIMEOUT \
    .venv/bin/mpimp train --config jobs/demo.toml "$@"
