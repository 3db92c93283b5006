#!/bin/bash
# Submit a whole experiment: training -> evaluation array -> figures, chained with
# --dependency=afterok. Prints the job ids. Site settings come from slurm/env.sh.
#
# Usage:
#   slurm/submit.sh --name NAME --config YAML --in DATASET[/SPLIT] [--ood DATASET/SPLIT]...
#                   [options] [KEY=VALUE ...]
#
# Examples:
#   # CelebA 32x32 on 4 GPU nodes, SVHN and smooth-noise OOD, validation split in-distribution
#   slurm/submit.sh --name celeba32 --config train/configs/celeba32.yaml --nodes 4 \
#       --in celeba/valid --ood svhn/test --ood gaussian-smooth/test --data-root /data/shards
#   # a grayscale model scoring RGB OOD sets
#   slurm/submit.sh --name fmnist --config train/configs/fashion_mnist32.yaml --in fashion-mnist/test \
#       --ood mnist/test --ood cifar10/test --ood svhn/test --convert-channels --data-root /data/shards
#   # the CPU demo: print the exact commands and job list, submit nothing
#   GLOW_CPU=1 GLOW_PROCS_PER_NODE=2 slurm/submit.sh --name demo --config train/configs/tiny.yaml \
#       --in demo/test --ood digits/test --dry-run
#
# Options:
#   --name NAME          run name: the run directory is $GLOW_RUN_ROOT/NAME (required)
#   --config YAML        training config, e.g. train/configs/celeba32.yaml (required)
#   --in DATASET[/SPLIT] in-distribution held-out split for the OOD table (default split: test;
#                        required unless --no-eval)
#   --ood DATASET/SPLIT  OOD split, repeatable (default: none)
#   --train-split SPLIT  in-distribution training split, dumped for the distributions and
#                        typicality rows; 'none' skips it (default: train)
#   --nodes N            training nodes (default: 1)
#   --data-root DIR      shard root for training and evaluation (default: the config's data.root)
#   --tasks "T ..."      evaluate.py tasks per split (default: "dump", which also writes bpd.json)
#   --run-tasks "T ..."  evaluate.py tasks once per run (default: "samples")
#   --convert-channels   let a grayscale model score RGB sets and the reverse (default: a
#                        channel mismatch is an error)
#   --accelerate-config FILE  training launch config (default: DDP), e.g.
#                        train/accelerate/deepspeed_zero2.yaml (default: $GLOW_ACCELERATE_CONFIG)
#   --no-eval            submit training only
#   --dry-run            print the exact sbatch commands and evaluation commands; submit nothing
#   -h, --help           show this help
#   KEY=VALUE            training config overrides, e.g. train.max_steps=20000
#
# Every name and split is checked (letters, digits, '.', '_', '-'; see slurm/names.sh) before
# anything is written. Logs: <run>/logs/{train-JOB,eval-ARRAY_TASK,figures-JOB}.out; the
# evaluation job list (one evaluate.py command line per array task): <run>/slurm/eval-jobs.txt.
# The figures job (CPU only, no GPU requested) writes <run>/figures/, index.html included.
# Exit codes: 0 submitted (or dry run), 2 usage error.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GLOW_REPO=$REPO
cd "$REPO"
# shellcheck source=slurm/names.sh
source "$REPO/slurm/names.sh"
for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && usage 0; done
# shellcheck source=slurm/env.sh
source "$REPO/slurm/env.sh"

NAME="" CONFIG="" NODES=1 IN="" DATA_ROOT="" DRY=0 EVAL=1 TRAIN_SPLIT=train ACC_CONFIG="${GLOW_ACCELERATE_CONFIG:-}"
TASKS="dump" RUN_TASKS="samples"
OOD=() OVERRIDES=() CONVERT=()
while (($#)); do
    case $1 in
        --name) NAME=${2?--name needs a value}; shift 2 ;;
        --config) CONFIG=${2?--config needs a value}; shift 2 ;;
        --nodes) NODES=${2?--nodes needs a value}; shift 2 ;;
        --in) IN=${2?--in needs a value}; shift 2 ;;
        --ood) OOD+=("${2?--ood needs a value}"); shift 2 ;;
        --train-split) TRAIN_SPLIT=${2?--train-split needs a value}; shift 2 ;;
        --data-root) DATA_ROOT=${2?--data-root needs a value}; shift 2 ;;
        --tasks) TASKS=${2?--tasks needs a value}; shift 2 ;;
        --run-tasks) RUN_TASKS=${2?--run-tasks needs a value}; shift 2 ;;
        --convert-channels) CONVERT=(--convert-channels); shift ;;
        --accelerate-config) ACC_CONFIG=${2:?--accelerate-config needs a value}; shift 2 ;;
        --no-eval) EVAL=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -*) die "unknown option '$1' (options: --name --config --in --ood --train-split --nodes --data-root --tasks --run-tasks --convert-channels --no-eval --dry-run; then KEY=VALUE overrides); see --help" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unexpected argument '$1': training overrides are KEY=VALUE; see --help" ;;
    esac
done
NAME_RULE="letters, digits, '.', '_' or '-', starting with a letter or digit"
[[ -n "$NAME" ]] || die "--name is required (the run directory will be $GLOW_RUN_ROOT/NAME)"
valid_name "$NAME" || die "--name '$NAME' is not a valid run name: use 1-128 $NAME_RULE"
valid_path "$GLOW_RUN_ROOT" || die "GLOW_RUN_ROOT '$GLOW_RUN_ROOT' (slurm/env.sh) must be a path without spaces, quotes or glob characters"
[[ -n "$CONFIG" ]] || die "--config is required (e.g. train/configs/tiny.yaml)"
[[ -f "$CONFIG" ]] || die "config '$CONFIG' not found (paths are relative to $REPO)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES' must be a positive integer"
[[ -z "$DATA_ROOT" ]] || valid_path "$DATA_ROOT" ||
    die "--data-root '$DATA_ROOT' must be a path without spaces, quotes or glob characters, not starting with '-'"
[[ -z "$ACC_CONFIG" || -f "$ACC_CONFIG" ]] ||
    die "--accelerate-config '$ACC_CONFIG' not found (e.g. train/accelerate/deepspeed_zero2.yaml; paths are relative to $REPO)"
read -r -a TASK_LIST <<<"$TASKS"
read -r -a RUN_TASK_LIST <<<"$RUN_TASKS"
if ((EVAL)); then
    [[ -n "$IN" ]] || die "--in DATASET[/SPLIT] is required (or pass --no-eval)"
    [[ "$IN" == */* ]] || IN="$IN/test"
    valid_spec "$IN" || die "--in '$IN' must be DATASET/SPLIT, each 1-128 $NAME_RULE"
    for o in "${OOD[@]}"; do
        valid_spec "$o" || die "--ood '$o' must be DATASET/SPLIT, each 1-128 $NAME_RULE"
    done
    [[ "$TRAIN_SPLIT" == none ]] || valid_name "$TRAIN_SPLIT" ||
        die "--train-split '$TRAIN_SPLIT' must be 'none' or a split name ($NAME_RULE)"
    for t in "${TASK_LIST[@]}" "${RUN_TASK_LIST[@]}"; do
        valid_task "$t" || die "task '$t' in --tasks/--run-tasks is not one of: ${GLOW_EVAL_TASKS[*]}"
    done
fi

RUN_DIR="$GLOW_RUN_ROOT/$NAME"
[[ -n "$DATA_ROOT" ]] && OVERRIDES+=("data.root=$DATA_ROOT")

# Options every job gets.
COMMON=(--parsable --kill-on-invalid-dep=yes --chdir="$REPO" --export=ALL,GLOW_REPO="$REPO")
[[ -n "$GLOW_PARTITION" ]] && COMMON+=(--partition="$GLOW_PARTITION")
[[ -n "$GLOW_ACCOUNT" ]] && COMMON+=(--account="$GLOW_ACCOUNT")
[[ -n "$GLOW_QOS" ]] && COMMON+=(--qos="$GLOW_QOS")
if [[ -n "$GLOW_SBATCH_EXTRA" ]]; then
    read -r -a EXTRA <<<"$GLOW_SBATCH_EXTRA"   # split on whitespace, never glob-expanded
    COMMON+=("${EXTRA[@]}")
fi

TRAIN=(sbatch "${COMMON[@]}" --nodes="$NODES" --job-name="glow-train-$NAME"
       --output="$RUN_DIR/logs/train-%j.out")
# The launch config reaches the training job only (a later --export replaces the earlier one).
[[ -n "$ACC_CONFIG" ]] && TRAIN+=(--export=ALL,GLOW_REPO="$REPO",GLOW_ACCELERATE_CONFIG="$ACC_CONFIG")
EVAL_OPTS=() FIG_OPTS=()
[[ -n "$GLOW_TIME" ]] && TRAIN+=(--time="$GLOW_TIME")
[[ -n "$GLOW_EVAL_TIME" ]] && EVAL_OPTS+=(--time="$GLOW_EVAL_TIME") && FIG_OPTS+=(--time="$GLOW_EVAL_TIME")
if [[ "$GLOW_CPU" == 1 ]]; then
    TRAIN+=(--cpus-per-task="$GLOW_PROCS_PER_NODE")
else
    TRAIN+=(--gpus-per-node="$GLOW_GPUS_PER_NODE" --cpus-per-task="$GLOW_CPUS_PER_TASK")
    ((GLOW_EVAL_GPUS > 0)) && EVAL_OPTS+=(--gpus-per-node="$GLOW_EVAL_GPUS")
fi
TRAIN+=(slurm/train.sbatch "$NAME" "$CONFIG" "${OVERRIDES[@]}")

# The evaluation job list: one line of evaluate.py arguments per array task. Every value
# in it was checked above (no whitespace, globs or leading '-'), so eval.sbatch's
# `read -r -a` gives back exactly these words.
CKPT="$RUN_DIR/checkpoints/latest"
DR=()
[[ -n "$DATA_ROOT" ]] && DR=(--data-root "$DATA_ROOT")
SPLITS=("$IN" "${OOD[@]}")
[[ "$TRAIN_SPLIT" != none && "${IN%%/*}/$TRAIN_SPLIT" != "$IN" ]] && SPLITS+=("${IN%%/*}/$TRAIN_SPLIT")
JOBS=()
if ((EVAL)); then
    for spec in "${SPLITS[@]}"; do
        for t in "${TASK_LIST[@]}"; do
            [[ "$t" == bpd && " ${TASK_LIST[*]} " == *" dump "* ]] && continue  # dump writes bpd.json
            JOBS+=("--checkpoint $CKPT --task $t --data $spec${DR:+ ${DR[*]}}${CONVERT:+ ${CONVERT[*]}}")
        done
    done
    for t in "${RUN_TASK_LIST[@]}"; do JOBS+=("--checkpoint $CKPT --task $t --data $IN${DR:+ ${DR[*]}}"); done
fi
JOBLIST="$RUN_DIR/slurm/eval-jobs.txt"
FIG=(--run "$RUN_DIR" --in "$IN" --train-split "$TRAIN_SPLIT")
for o in "${OOD[@]}"; do FIG+=(--ood "$o"); done
[[ -n "$DATA_ROOT" ]] && FIG+=(--data-root "$DATA_ROOT")

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

if ((DRY)); then
    echo "# dry run: nothing submitted"
    show "${TRAIN[@]}"
    if ((EVAL && ${#JOBS[@]})); then
        echo "# $JOBLIST would contain ${#JOBS[@]} lines; array task i runs"
        echo "#   accelerate launch ... ${GLOW_EVAL_SCRIPT:-eval/evaluate.py} <line i+1>, i.e."
        for i in "${!JOBS[@]}"; do printf '#   task %d: %s %s\n' "$i" "${GLOW_EVAL_SCRIPT:-eval/evaluate.py}" "${JOBS[$i]}"; done
        show sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --array="0-$((${#JOBS[@]} - 1))" \
            --dependency=afterok:TRAIN_JOB_ID --job-name="glow-eval-$NAME" \
            --output="$RUN_DIR/logs/eval-%A_%a.out" slurm/eval.sbatch "$JOBLIST"
        show sbatch "${COMMON[@]}" "${FIG_OPTS[@]}" --dependency=afterok:EVAL_JOB_ID \
            --job-name="glow-figures-$NAME" --output="$RUN_DIR/logs/figures-%j.out" \
            slurm/figures.sbatch "${FIG[@]}"
        echo "# figures job runs: $(show python "${GLOW_FIGURES_SCRIPT:-eval/figures.py}" "${FIG[@]}")"
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
    FIG_ID=$(sbatch "${COMMON[@]}" "${FIG_OPTS[@]}" --dependency=afterok:"$EVAL_ID" \
        --job-name="glow-figures-$NAME" --output="$RUN_DIR/logs/figures-%j.out" \
        slurm/figures.sbatch "${FIG[@]}")
    FIG_ID=${FIG_ID%%;*}
    echo "figures $FIG_ID  (output: $RUN_DIR/figures/)"
fi
