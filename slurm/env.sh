# shellcheck shell=bash
# Site settings for glow-ood on Slurm: the ONE file a site edits.
#
# Sourced by slurm/submit.sh (submission defaults) and by every slurm/*.sbatch at the
# start of a job (software environment). Every value uses `: "${VAR:=default}"`, so a
# value already in the environment wins: `GLOW_CPU=1 slurm/submit.sh ...` needs no edit.
# submit.sh checks these values before it submits (names, paths, numbers; the venv and the
# scripts exist). See docs/cluster.md ("Adapting to a site") and README ("On a cluster").

# --- Where the code is ---------------------------------------------------------------
# Jobs run from the repository root. submit.sh exports GLOW_REPO; a plain `sbatch`
# falls back to the directory sbatch was called from.
: "${GLOW_REPO:=${SLURM_SUBMIT_DIR:-$(pwd)}}"
: "${GLOW_RUN_ROOT:=runs}"          # run directories: $GLOW_RUN_ROOT/<name> (relative to GLOW_REPO)

# --- Software environment ------------------------------------------------------------
# Either load modules ...
# module purge
# module load python/3.11 cuda/12.4
# ... or activate a virtualenv (default: the repository's .venv, made by `make install`),
# on storage every node sees. Using modules only: set GLOW_VENV="" here.
: "${GLOW_VENV:=$GLOW_REPO/.venv}"
if [[ -n "$GLOW_VENV" && -f "$GLOW_VENV/bin/activate" && "${VIRTUAL_ENV:-}" != "$GLOW_VENV" ]]; then
    # shellcheck disable=SC1091
    source "$GLOW_VENV/bin/activate"
fi

# --- Scheduler defaults (passed by submit.sh as sbatch options; empty = site default) -
: "${GLOW_PARTITION:=}"             # e.g. gpu
: "${GLOW_ACCOUNT:=}"               # e.g. my-project
: "${GLOW_QOS:=}"
: "${GLOW_TIME:=}"                  # e.g. 24:00:00 (training); eval/figures use GLOW_EVAL_TIME
: "${GLOW_EVAL_TIME:=}"
: "${GLOW_SBATCH_EXTRA:=}"          # any other sbatch options, e.g. "--constraint=a100 --exclusive"

# --- Hardware ------------------------------------------------------------------------
: "${GLOW_GPUS_PER_NODE:=4}"        # GPUs requested per training node (also processes per node)
: "${GLOW_CPUS_PER_TASK:=32}"       # CPU cores per node for data loading (one task per node)
: "${GLOW_EVAL_GPUS:=1}"            # GPUs per evaluation array task
# CPU mode (tests, CPU clusters): GLOW_CPU=1 requests no GPUs and launches
# GLOW_PROCS_PER_NODE gloo processes per node with ACCELERATE_USE_CPU=1.
: "${GLOW_CPU:=0}"
if [[ "$GLOW_CPU" == 1 ]]; then
    : "${GLOW_PROCS_PER_NODE:=1}"
    : "${GLOW_EVAL_PROCS:=1}"
fi
# GLOW_PROCS_PER_NODE / GLOW_EVAL_PROCS, when set, win over the GPUs Slurm gave the node
# (SLURM_GPUS_ON_NODE); unset in GPU mode = one process per GPU.

# --- Entry scripts (relative to GLOW_REPO; tests swap in stand-ins) -------------------
: "${GLOW_TRAIN_SCRIPT:=train/train.py}"
: "${GLOW_EVAL_SCRIPT:=eval/evaluate.py}"
: "${GLOW_FIGURES_SCRIPT:=eval/figures.py}"

# --- Launcher ------------------------------------------------------------------------
: "${GLOW_ACCELERATE_ARGS:=--mixed_precision no --dynamo_backend no}"
: "${GLOW_ACCELERATE_CONFIG:=}"     # training launch config, e.g. train/accelerate/deepspeed_zero2.yaml
                                    # (submit.sh --accelerate-config); empty: DDP (--multi_gpu)
: "${GLOW_PORT_BASE:=15000}"        # rendezvous port = base + job id % 15000 (below the
                                    # Linux ephemeral range)
# MASTER_PORT=29500                 # a fixed rendezvous port instead (unset: the formula above)
: "${GLOW_MAX_REQUEUES:=50}"        # train.sbatch requeues itself at most this many times
# GLOW_ALLOW_SHARED_RUN=1           # accept a run directory owned by another user or reached
                                    # through a symlink (a deliberate shared layout; submit.sh
                                    # --allow-shared-run); see docs/cluster.md "Trust and sharing"
# wandb (run.logger=wandb) is offline by default through the config (run.wandb_mode); a
# WANDB_MODE exported here would override every run's choice, so none is set.

# --- NCCL (GPU mode; uncomment what your interconnect needs) -------------------------
# export NCCL_SOCKET_IFNAME=ib0          # interface for bootstrap/TCP traffic (not lo/docker)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1               # no InfiniBand: fall back to sockets
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA policy
# export NCCL_DEBUG=INFO                 # print topology/transport choice (debugging hangs)
# export GLOO_SOCKET_IFNAME=ib0          # gloo (CPU mode / object collectives) interface
# A dead or hung rank fails the job after dist.timeout_s instead of hanging it (the current
# name; NCCL_ASYNC_ERROR_HANDLING is deprecated). Not a site choice: always on.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
