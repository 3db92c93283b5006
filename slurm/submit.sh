#!/bin/bash
# Submit a whole experiment: training -> evaluation array -> figures, chained with
# --dependency=afterok. Prints the job ids. Site settings come from slurm/env.sh.
#
#   slurm/submit.sh --name NAME --config train/configs/X.yaml --in DATASET[/SPLIT] \
#       [--ood DATASET/SPLIT]... [--nodes N] [--data-root DIR] [--tasks "dump bpd"] \
#       [--run-tasks "samples"] [--convert-channels] [--no-eval] [--dry-run] [key=value ...]
#
# Examples:
#   slurm/submit.sh --name celeba32 --config train/configs/celeba32.yaml --nodes 4 \
#       --in celeba/test --ood svhn/test --ood gaussian-smooth/test --data-root /data/shards
#   slurm/submit.sh --name fmnist --config train/configs/fashion_mnist32.yaml --in fashion-mnist/test \
#       --ood mnist/test --ood cifar10/test --ood svhn/test --convert-channels --data-root /data/shards
#   GLOW_CPU=1 GLOW_PROCS_PER_NODE=2 slurm/submit.sh --name demo --config train/configs/tiny.yaml \
#       --in demo/test --ood digits/test --dry-run
#
# key=value arguments are training config overrides. --tasks are run for the in-distribution
# split and every OOD split; --run-tasks once per run (with the in-distribution split).
# --convert-channels lets a grayscale model score RGB OOD sets (and the reverse).
# Logs: <run>/logs/{train-JOB,eval-ARRAY_TASK,figures-JOB}.out; job list: <run>/slurm/eval-jobs.txt.
set -euo pipefail

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GLOW_REPO=$REPO
cd "$REPO"
# shellcheck source=slurm/env.sh
source "$REPO/slurm/env.sh"

NAME="" CONFIG="" NODES=1 IN="" DATA_ROOT="" DRY=0 EVAL=1
TASKS="dump bpd" RUN_TASKS="samples"
OOD=() OVERRIDES=() CONVERT=""
while (($#)); do
    case $1 in
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a value}; shift 2 ;;
        --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
        --in) IN=${2:?--in needs a value}; shift 2 ;;
        --ood) OOD+=("${2:?--ood needs a value}"); shift 2 ;;
        --data-root) DATA_ROOT=${2:?--data-root needs a value}; shift 2 ;;
        --tasks) TASKS=${2?--tasks needs a value}; shift 2 ;;
        --run-tasks) RUN_TASKS=${2?--run-tasks needs a value}; shift 2 ;;
        --convert-channels) CONVERT=" --convert-channels"; shift ;;
        --no-eval) EVAL=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) usage 0 ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unknown argument '$1' (options: --name --config --nodes --in --ood --data-root --tasks --run-tasks --convert-channels --no-eval --dry-run, then key=value overrides); see --help" ;;
    esac
done
[[ -n "$NAME" ]] || die "--name is required (the run directory will be $GLOW_RUN_ROOT/NAME)"
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name '$NAME' may only contain letters, digits, '.', '_' and '-'"
[[ -n "$CONFIG" ]] || die "--config is required (e.g. train/configs/tiny.yaml)"
[[ -f "$CONFIG" ]] || die "config '$CONFIG' not found (paths are relative to $REPO)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES' must be a positive integer"
if ((EVAL)); then
    [[ -n "$IN" ]] || die "--in DATASET[/SPLIT] is required (or pass --no-eval)"
    [[ "$IN" == */* ]] || IN="$IN/test"
    for o in "${OOD[@]}"; do [[ "$o" == */* ]] || die "--ood '$o' must be DATASET/SPLIT"; done
fi

RUN_DIR="$GLOW_RUN_ROOT/$NAME"
[[ -n "$DATA_ROOT" ]] && OVERRIDES+=("data.root=$DATA_ROOT")

# Options every job gets.
COMMON=(--parsable --kill-on-invalid-dep=yes --chdir="$REPO" --export=ALL,GLOW_REPO="$REPO")
[[ -n "$GLOW_PARTITION" ]] && COMMON+=(--partition="$GLOW_PARTITION")
[[ -n "$GLOW_ACCOUNT" ]] && COMMON+=(--account="$GLOW_ACCOUNT")
[[ -n "$GLOW_QOS" ]] && COMMON+=(--qos="$GLOW_QOS")
# shellcheck disable=SC2206
[[ -n "$GLOW_SBATCH_EXTRA" ]] && COMMON+=($GLOW_SBATCH_EXTRA)

TRAIN=(sbatch "${COMMON[@]}" --nodes="$NODES" --job-name="glow-train-$NAME"
       --output="$RUN_DIR/logs/train-%j.out")
EVAL_OPTS=()
[[ -n "$GLOW_TIME" ]] && TRAIN+=(--time="$GLOW_TIME")
[[ -n "$GLOW_EVAL_TIME" ]] && EVAL_OPTS+=(--time="$GLOW_EVAL_TIME")
if [[ "$GLOW_CPU" == 1 ]]; then
    TRAIN+=(--cpus-per-task="$GLOW_PROCS_PER_NODE")
else
    TRAIN+=(--gpus-per-node="$GLOW_GPUS_PER_NODE" --cpus-per-task="$GLOW_CPUS_PER_TASK")
    ((GLOW_EVAL_GPUS > 0)) && EVAL_OPTS+=(--gpus-per-node="$GLOW_EVAL_GPUS")
fi
TRAIN+=(slurm/train.sbatch "$NAME" "$CONFIG" "${OVERRIDES[@]}")

# The evaluation job list: one line of evaluate.py arguments per array task.
CKPT="$RUN_DIR/checkpoints/latest"
DR=()
[[ -n "$DATA_ROOT" ]] && DR=(--data-root "$DATA_ROOT")
JOBS=()
if ((EVAL)); then
    for spec in "$IN" "${OOD[@]}"; do
        for t in $TASKS; do JOBS+=("--checkpoint $CKPT --task $t --data $spec ${DR[*]}$CONVERT"); done
    done
    for t in $RUN_TASKS; do JOBS+=("--checkpoint $CKPT --task $t --data $IN ${DR[*]}"); done
fi
JOBLIST="$RUN_DIR/slurm/eval-jobs.txt"

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

if ((DRY)); then
    echo "# dry run: nothing submitted"
    show "${TRAIN[@]}"
    if ((EVAL && ${#JOBS[@]})); then
        echo "# $JOBLIST would contain:"
        printf '#   %s\n' "${JOBS[@]}"
        show sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --array="0-$((${#JOBS[@]} - 1))" \
            --dependency=afterok:TRAIN_JOB_ID --job-name="glow-eval-$NAME" \
            --output="$RUN_DIR/logs/eval-%A_%a.out" slurm/eval.sbatch "$JOBLIST"
        FIG=(--run "$RUN_DIR" --in "${IN%%/*}")
        for o in "${OOD[@]}"; do FIG+=(--ood "$o"); done
        show sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --dependency=afterok:EVAL_JOB_ID \
            --job-name="glow-figures-$NAME" --output="$RUN_DIR/logs/figures-%j.out" \
            slurm/figures.sbatch "${FIG[@]}"
    fi
    exit 0
fi

mkdir -p "$RUN_DIR/logs" "$RUN_DIR/slurm"
TRAIN_ID=$("${TRAIN[@]}")
TRAIN_ID=${TRAIN_ID%%;*}
echo "train   $TRAIN_ID  (log: $RUN_DIR/logs/train-$TRAIN_ID.out)"
if ((EVAL && ${#JOBS[@]})); then
    printf '%s\n' "${JOBS[@]}" >"$JOBLIST"
    EVAL_ID=$(sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --array="0-$((${#JOBS[@]} - 1))" \
        --dependency=afterok:"$TRAIN_ID" --job-name="glow-eval-$NAME" \
        --output="$RUN_DIR/logs/eval-%A_%a.out" slurm/eval.sbatch "$JOBLIST")
    EVAL_ID=${EVAL_ID%%;*}
    echo "eval    $EVAL_ID  (${#JOBS[@]} tasks, list: $JOBLIST)"
    FIG=(--run "$RUN_DIR" --in "${IN%%/*}")
    for o in "${OOD[@]}"; do FIG+=(--ood "$o"); done
    FIG_ID=$(sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --dependency=afterok:"$EVAL_ID" \
        --job-name="glow-figures-$NAME" --output="$RUN_DIR/logs/figures-%j.out" \
        slurm/figures.sbatch "${FIG[@]}")
    FIG_ID=${FIG_ID%%;*}
    echo "figures $FIG_ID  (output: $RUN_DIR/figures/)"
fi
