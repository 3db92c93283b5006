# shellcheck shell=bash
# What the sbatch templates compute the same way, defined once: processes per node, the
# rendezvous port, CPU mode, and the private directory through which glow's launcher
# (python -m glow.cli.launch) reports a user error. Sourced after slurm/env.sh by
# train.sbatch and eval.sbatch. Every value used in arithmetic is checked to be digits first.

# is_count VALUE: VALUE is a non-negative decimal integer (safe for shell arithmetic).
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

# procs_per_node OVERRIDE WHAT: processes to start on this node: OVERRIDE (GLOW_PROCS_PER_NODE,
# GLOW_EVAL_PROCS) when set, else the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), else the
# GPUs nvidia-smi lists. Prints a positive integer, or says what to do and fails.
procs_per_node() {
    local n=$1 what=$2
    [[ -n "$n" ]] || n=${SLURM_GPUS_ON_NODE:-}
    [[ -n "$n" ]] || n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "$what: no GPUs found on $(hostname) (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'): request" \
             "GPUs (GLOW_GPUS_PER_NODE / GLOW_EVAL_GPUS in slurm/env.sh) or set GLOW_CPU=1 for CPU mode" >&2
        return 1
    fi
    echo "$n"
}

# rendezvous_port WHAT: MASTER_PORT when set, else GLOW_PORT_BASE + job id % 15000 (below the
# Linux ephemeral range). Every job, and every task of an array, has its own job id, so tasks
# that share a node get different ports. The batch script runs on the rendezvous host: a derived
# port something there already listens on (the previous attempt of a requeued job still shutting
# down, another job's port) is passed over for the next free one of 16 (accelerate refuses a busy
# port on multi-node launches).
rendezvous_port() {
    local what=$1 port=${MASTER_PORT:-} tries=0
    if [[ -z "$port" ]]; then
        if ! is_count "$GLOW_PORT_BASE" || ! is_count "${SLURM_JOB_ID:-}"; then
            echo "$what: GLOW_PORT_BASE='$GLOW_PORT_BASE' and SLURM_JOB_ID='${SLURM_JOB_ID:-}' must be numbers" >&2
            return 1
        fi
        port=$((10#$GLOW_PORT_BASE + 10#$SLURM_JOB_ID % 15000))
        while port_listened_on "$port" && ((tries < 15)); do
            echo "$what: port $port is in use on this host; trying $((port + 1))" >&2
            port=$((port + 1))
            tries=$((tries + 1))
        done
    fi
    if ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || ((10#$port > 65535)); then
        echo "$what: rendezvous port '$port' (MASTER_PORT or GLOW_PORT_BASE) is not a port number" >&2
        return 1
    fi
    echo "$port"
}

# port_listened_on PORT: whether a process on this host accepts connections on PORT (IPv4 or IPv6).
port_listened_on() {
    local host
    for host in 127.0.0.1 ::1; do
        if (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

# cpu_mode_env USE_DEEPSPEED: in CPU mode (GLOW_CPU=1), gloo processes: ACCELERATE_USE_CPU=1
# (`--cpu` would silently start ONE process) unless DeepSpeed runs (accelerate would silently
# drop it; glow.distributed gives it a gloo process group instead), and one thread each.
cpu_mode_env() {
    [[ "$GLOW_CPU" == 1 ]] || return 0
    [[ "$1" == 1 ]] || export ACCELERATE_USE_CPU=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

# exit_dir_setup: a private directory on this node (mode 0700) where glow's launcher leaves
# the closing line of a user error (`error`); exported as GLOW_EXIT_DIR, removed on exit.
exit_dir_setup() {
    GLOW_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/glow-exit.XXXXXXXX") || return 1
    export GLOW_EXIT_DIR
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$GLOW_EXIT_DIR'" EXIT
}

# exit_dir_message: the launcher's closing line (`error: ...`) on stderr; fails when it left
# none (the attempt did not end on a user error on this node).
exit_dir_message() {
    [[ -f "$GLOW_EXIT_DIR/error" && ! -L "$GLOW_EXIT_DIR/error" ]] && head -n 1 "$GLOW_EXIT_DIR/error" >&2
}
