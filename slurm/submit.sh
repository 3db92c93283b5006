#!/bin/bash
# Submit an experiment: training -> evaluation array -> figures, chained with
# --dependency=afterok, after checking on this node what the jobs would check first.
# Prints the job ids. Site settings come from slurm/env.sh.
#
# Usage:
#   slurm/submit.sh --name NAME --config YAML --in DATASET[/SPLIT] [--ood DATASET/SPLIT]...
#                   [options] [KEY=VALUE ...]
#   slurm/submit.sh --only eval,figures --name NAME --in DATASET[/SPLIT] --ood ... [options]
#   slurm/submit.sh --finish NAME
#
# Examples:
#   # CelebA 32x32 on 4 GPU nodes, SVHN and CIFAR-10 OOD, validation split in-distribution
#   slurm/submit.sh --name celeba32 --config train/configs/celeba32.yaml --nodes 4 \
#       --in celeba/valid --ood svhn/test --ood cifar10/test --data-root /data/shards
#   # a grayscale model scoring RGB OOD sets
#   slurm/submit.sh --name fmnist --config train/configs/fashion_mnist32.yaml --in fashion-mnist/test \
#       --ood mnist/test --ood cifar10/test --ood svhn/test --convert-channels --data-root /data/shards
#   # good enough: end training at its next step; evaluation and figures then run on that checkpoint
#   slurm/submit.sh --finish celeba32
#   # evaluation and figures again (e.g. another OOD set), no training allocation
#   slurm/submit.sh --only eval,figures --name celeba32 --in celeba/valid --ood svhn/test \
#       --ood mnist/test --convert-channels --data-root /data/shards
#   # the CPU demo: check everything and print the exact commands, submit nothing
#   GLOW_CPU=1 GLOW_PROCS_PER_NODE=2 slurm/submit.sh --name demo --config train/configs/tiny.yaml \
#       --in demo/test --ood digits/test --data-root data/shards --dry-run
#
# Options:
#   --name NAME          run name: the run directory is $GLOW_RUN_ROOT/NAME (required)
#   --config YAML|NAME   training config: a file or a shipped config's name, e.g. celeba32 or
#                        train/configs/celeba32.yaml (required with training)
#   --in DATASET[/SPLIT] in-distribution held-out split for the OOD table (default split: test;
#                        required with evaluation or figures)
#   --ood DATASET/SPLIT  OOD split, repeatable (at least one with figures)
#   --train-split SPLIT  in-distribution training split, dumped for the distributions and
#                        typicality rows; 'none' skips it (default: train)
#   --nodes N            training nodes (default: 1)
#   --seeds N            N seeds of the recipe as N runs: NAME-s0 .. NAME-s<N-1>, run k with
#                        train.seed=k, each a chain of its own (checked and submitted in turn;
#                        `eval/report.py compare --group-seeds` puts them in one row)
#   --data-root DIR      shard root for training and evaluation (default: the config's data.root;
#                        with --only eval: the one the checkpoint was trained on)
#   --tasks "T ..."      evaluate.py tasks per split (default: "dump", which also writes bpd.json)
#   --run-tasks "T ..."  evaluate.py tasks once per run (default: "samples")
#   --convert-channels   let a grayscale model score RGB sets and the reverse (default: a
#                        channel mismatch is an error)
#   --accelerate-config FILE  training launch config (default: DDP), e.g.
#                        train/accelerate/deepspeed_zero2.yaml (default: $GLOW_ACCELERATE_CONFIG)
#   --only STAGES        submit only these of train,eval,figures (comma list in that order, e.g.
#                        eval,figures or figures): evaluation and figures of an existing run's
#                        newest complete checkpoint, with the same partition, account and GPU
#                        settings and no training allocation (default: train,eval,figures)
#   --no-eval            submit training only (= --only train)
#   --finish NAME        ask run NAME's trainer to save a checkpoint at its next step and end
#                        (touches $GLOW_RUN_ROOT/NAME/FINISH): the job ends COMPLETED, not requeued,
#                        and its evaluation and figures jobs run on that checkpoint
#   --skip-preflight     skip the checks of config, shards, weights and time limit (for a login
#                        node that cannot see the data); names and the run directory are still checked
#   --allow-shared-run   accept a run directory owned by another user or reached through a
#                        symlink (a deliberate shared layout; exports GLOW_ALLOW_SHARED_RUN=1)
#   --dry-run            run the checks, print the exact sbatch and evaluation commands; submit nothing
#   -h, --help           show this help
#   KEY=VALUE            training config overrides, e.g. train.max_steps=20000
#
# Before any sbatch (and with --dry-run), on this node: every name and split is checked
# (letters, digits, '.', '_', '-'; see slurm/names.sh); the run directory must not be a symlink
# or another user's; the venv and the entry scripts must exist; then `python -m glow.preflight`
# runs the jobs' own first checks: the config with every override, the shards of the training
# split and of every evaluated split (manifest, resolution, channels), the Inception weights when
# FID is asked, the time limit (GLOW_TIME) against start-up before the preemption signal, a
# complete checkpoint (--only eval) or the dumps (--only figures), a writable run root. A failed
# check prints one line with its exit code and submits and writes nothing.
# Logs: <run>/logs/{train-JOB,eval-ARRAY_TASK,figures-JOB}.out; the evaluation work items (one
# evaluate.py argument list per array task, passed to the array as its arguments and kept for
# people in <run>/slurm/eval-jobs.txt). The figures job (CPU only, no GPU) writes <run>/figures/.
# Exit codes: 0 submitted (or dry run, or finish requested); 2 usage or configuration error;
# 4 data error (shards, dumps); 5 checkpoint or FID weights missing; 1 sbatch failed.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit "${1:-0}"; }
refuse() { echo "submit.sh: error (exit $1): $2" >&2; exit "$1"; }   # CODE MESSAGE
die() { refuse 2 "$*"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GLOW_REPO=$REPO
cd "$REPO"
# shellcheck source=slurm/names.sh
source "$REPO/slurm/names.sh"
for arg in "$@"; do [[ "$arg" == -h || "$arg" == --help ]] && usage 0; done
# shellcheck source=slurm/env.sh
source "$REPO/slurm/env.sh"

NAME="" CONFIG="" NODES=1 IN="" DATA_ROOT="" DRY=0 ONLY=train,eval,figures FINISH="" PREFLIGHT=1 SEEDS=""
ARGS=() SKIP=0   # the arguments less --name NAME and --seeds N: what the run of each seed gets
for arg in "$@"; do
    if ((SKIP)); then SKIP=0; continue; fi
    case $arg in --name | --seeds) SKIP=1 ;; *) ARGS+=("$arg") ;; esac
done
TRAIN_SPLIT=train ACC_CONFIG="$GLOW_ACCELERATE_CONFIG" TASKS="dump" RUN_TASKS="samples"
OOD=() OVERRIDES=() CONVERT=()
while (($#)); do
    case $1 in
        --name) NAME=${2?--name needs a value}; shift 2 ;;
        --seeds) SEEDS=${2?--seeds needs a value}; shift 2 ;;
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
        --only) ONLY=${2?--only needs a value}; shift 2 ;;
        --no-eval) ONLY=train; shift ;;
        --finish) FINISH=${2?--finish needs a run name}; shift 2 ;;
        --skip-preflight) PREFLIGHT=0; shift ;;
        --allow-shared-run) export GLOW_ALLOW_SHARED_RUN=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -*) die "unknown option '$1' (options: --name --config --in --ood --train-split --nodes --seeds --data-root --tasks --run-tasks --convert-channels --accelerate-config --only --no-eval --finish --skip-preflight --allow-shared-run --dry-run; then KEY=VALUE overrides); see --help" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unexpected argument '$1': training overrides are KEY=VALUE; see --help" ;;
    esac
done
NAME_RULE="letters, digits, '.', '_' or '-', starting with a letter or digit"
valid_path "$GLOW_RUN_ROOT" || die "GLOW_RUN_ROOT '$GLOW_RUN_ROOT' (slurm/env.sh) must be a path without spaces, quotes or glob characters"

# check_trust RUN_DIR: refuse a run directory (or a fixed subfolder) that is a symlink or another
# user's, unless GLOW_ALLOW_SHARED_RUN=1 (glow.run check-trust; skipped where glow lacks it).
check_trust() {
    local msg rc=0
    [[ -e "$1" || -L "$1" ]] || return 0
    msg=$(python -m glow.run check-trust "$1" 2>&1 >/dev/null) || rc=$?
    ((rc == 0)) || [[ "$msg" == *"invalid choice: 'check-trust'"* ]] || refuse "$rc" "${msg#error: }"
}

if [[ -n "$FINISH" ]]; then    # --finish NAME: one control file, nothing submitted
    valid_name "$FINISH" || die "--finish '$FINISH' is not a valid run name: use 1-128 $NAME_RULE"
    RUN_DIR="$GLOW_RUN_ROOT/$FINISH"
    [[ -d "$RUN_DIR" && ! -L "$RUN_DIR" ]] || die "no run directory $RUN_DIR (GLOW_RUN_ROOT=$GLOW_RUN_ROOT) to finish"
    check_trust "$RUN_DIR"
    if ((DRY)); then echo "# dry run: would create $RUN_DIR/FINISH"; exit 0; fi
    (set -C; : >"$RUN_DIR/FINISH") 2>/dev/null || [[ -f "$RUN_DIR/FINISH" && ! -L "$RUN_DIR/FINISH" ]] ||
        die "cannot create $RUN_DIR/FINISH"
    echo "finish requested: $RUN_DIR/FINISH. The trainer saves a checkpoint at its next step and ends (job"
    echo "COMPLETED, not requeued); the evaluation and figures jobs then run on that checkpoint."
    exit 0
fi

# The stages: a comma list in pipeline order.
case $ONLY in
    train,eval,figures) STAGES=(train eval figures) ;;
    train) STAGES=(train) ;;
    train,eval) STAGES=(train eval) ;;
    eval,figures) STAGES=(eval figures) ;;
    eval) STAGES=(eval) ;;
    figures) STAGES=(figures) ;;
    *) die "--only '$ONLY' must be train, eval or figures, or several of them in that order (e.g. eval,figures)" ;;
esac
has() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

[[ -n "$NAME" ]] || die "--name is required (the run directory will be $GLOW_RUN_ROOT/NAME)"
valid_name "$NAME" || die "--name '$NAME' is not a valid run name: use 1-128 $NAME_RULE"
if [[ -n "$SEEDS" ]]; then   # one chain per seed: this script again, as NAME-s<k> with train.seed=k
    [[ "$SEEDS" =~ ^[1-9][0-9]{0,2}$ ]] || die "--seeds '$SEEDS' must be a number of runs from 1 to 999"
    has train || die "--seeds trains the recipe once per seed: it needs the train stage (not --only $ONLY)"
    for ((k = 0; k < 10#$SEEDS; k++)); do
        echo "# seed $k of $SEEDS: run $NAME-s$k (train.seed=$k)"
        "$0" "${ARGS[@]}" --name "$NAME-s$k" "train.seed=$k" || exit $?
    done
    exit 0
fi
[[ -z "$DATA_ROOT" ]] || valid_path "$DATA_ROOT" ||
    die "--data-root '$DATA_ROOT' must be a path without spaces, quotes or glob characters, not starting with '-'"
if has train; then
    [[ -n "$CONFIG" ]] || die "--config is required (e.g. train/configs/tiny.yaml)"
    # A file, or the name of a shipped config (e.g. celeba32; the preflight checks that it exists).
    [[ -f "$CONFIG" ]] || valid_name "$CONFIG" || die "config '$CONFIG' not found (paths are relative to $REPO)"
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES' must be a positive integer"
    [[ -z "$ACC_CONFIG" || -f "$ACC_CONFIG" ]] ||
        die "--accelerate-config '$ACC_CONFIG' not found (e.g. train/accelerate/deepspeed_zero2.yaml; paths are relative to $REPO)"
elif [[ -n "$CONFIG" || ${#OVERRIDES[@]} -gt 0 ]]; then
    echo "submit.sh: note: --config and KEY=VALUE overrides are for training; not used with --only $ONLY" >&2
fi
read -r -a TASK_LIST <<<"$TASKS"
read -r -a RUN_TASK_LIST <<<"$RUN_TASKS"
if has eval || has figures; then
    [[ -n "$IN" ]] || die "--in DATASET[/SPLIT] is required (or pass --only train)"
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
    ! has figures || ((${#OOD[@]})) || die "the figures need at least one --ood DATASET/SPLIT (or pass --only eval)"
fi
for v in GLOW_GPUS_PER_NODE GLOW_CPUS_PER_TASK GLOW_EVAL_GPUS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v='${!v}' (slurm/env.sh) must be a number"
done
if [[ "$GLOW_CPU" == 1 ]]; then
    for v in GLOW_PROCS_PER_NODE GLOW_EVAL_PROCS; do
        [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v='${!v}' (slurm/env.sh, CPU mode) must be a positive number"
    done
fi

RUN_DIR="$GLOW_RUN_ROOT/$NAME"
[[ -n "$DATA_ROOT" ]] && has train && OVERRIDES+=("data.root=$DATA_ROOT")
SPLITS=("$IN" "${OOD[@]}")
[[ "$TRAIN_SPLIT" != none && "${IN%%/*}/$TRAIN_SPLIT" != "$IN" ]] && SPLITS+=("${IN%%/*}/$TRAIN_SPLIT")

# ------------------------------------------------------------------ checks before the queue
check_trust "$RUN_DIR"
if ((PREFLIGHT)); then
    if [[ -n "$GLOW_VENV" && ! -f "$GLOW_VENV/bin/activate" ]]; then
        refuse 2 "GLOW_VENV=$GLOW_VENV (slurm/env.sh) has no bin/activate: the jobs would run without the project's environment; create it (make install, README 'On a cluster') or set GLOW_VENV=\"\" when modules provide Python"
    fi
    command -v python >/dev/null || refuse 2 "no 'python' on PATH after slurm/env.sh: load a module or set GLOW_VENV"
    for stage in "${STAGES[@]}"; do
        case $stage in train) s=$GLOW_TRAIN_SCRIPT ;; eval) s=$GLOW_EVAL_SCRIPT ;; figures) s=$GLOW_FIGURES_SCRIPT ;; esac
        [[ -f "$s" ]] || refuse 2 "the $stage job's script $s (relative to $REPO) does not exist"
    done
    # What the jobs check first, run here (glow/preflight.py).
    PF=(--run-dir "$RUN_DIR" --stages "$(IFS=,; echo "${STAGES[*]}")" --in "$IN")
    has train && PF+=(--config "$CONFIG" --time "$GLOW_TIME"
                      --signal-lead "$(sed -n 's/^#SBATCH --signal=B:USR1@\([0-9]*\)$/\1/p' slurm/train.sbatch)")
    [[ -n "$DATA_ROOT" ]] && PF+=(--data-root "$DATA_ROOT")
    ((${#CONVERT[@]})) && PF+=(--convert-channels)
    for o in "${OOD[@]}"; do PF+=(--ood "$o"); done
    for t in "${TASK_LIST[@]}" "${RUN_TASK_LIST[@]}"; do [[ "$t" == fid ]] && PF+=(--fid); done
    for t in "${TASK_LIST[@]}"; do   # the tasks that read a split's shards (evaluate.py SHAPE_TASKS)
        [[ "$t" == samples ]] || ! has eval || { for spec in "${SPLITS[@]}"; do PF+=(--split "$spec"); done; break; }
    done
    python -m glow.preflight --prefix "submit.sh: " "${PF[@]}" -- "${OVERRIDES[@]}" || exit $?
fi

# ------------------------------------------------------------------ the commands
# Options every job gets. (SC2054: the commas are sbatch's syntax for --export, not array separators.)
# shellcheck disable=SC2054
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
# shellcheck disable=SC2054
[[ -n "$ACC_CONFIG" ]] && TRAIN+=(--export=ALL,GLOW_REPO="$REPO",GLOW_ACCELERATE_CONFIG="$ACC_CONFIG")
EVAL_OPTS=() FIG_OPTS=()
[[ -n "$GLOW_TIME" ]] && TRAIN+=(--time="$GLOW_TIME")
[[ -n "$GLOW_EVAL_TIME" ]] && EVAL_OPTS+=(--time="$GLOW_EVAL_TIME") && FIG_OPTS+=(--time="$GLOW_EVAL_TIME")
if [[ "$GLOW_CPU" == 1 ]]; then
    TRAIN+=(--cpus-per-task="$GLOW_PROCS_PER_NODE")
    EVAL_OPTS+=(--cpus-per-task="$GLOW_EVAL_PROCS")
else
    TRAIN+=(--gpus-per-node="$GLOW_GPUS_PER_NODE" --cpus-per-task="$GLOW_CPUS_PER_TASK")
    ((10#$GLOW_EVAL_GPUS > 0)) && EVAL_OPTS+=(--gpus-per-node="$GLOW_EVAL_GPUS")
fi
TRAIN+=(slurm/train.sbatch "$NAME" "$CONFIG" "${OVERRIDES[@]}")

# The evaluation work items: one string of evaluate.py arguments per array task, passed to the
# array as its arguments. Every value in them was checked above (no whitespace, globs or leading
# '-'), so eval.sbatch's `read -r -a` gives back exactly these words.
CKPT="$RUN_DIR/checkpoints/latest"
DR=()
[[ -n "$DATA_ROOT" ]] && DR=(--data-root "$DATA_ROOT")
JOBS=()
if has eval; then
    for spec in "${SPLITS[@]}"; do
        for t in "${TASK_LIST[@]}"; do
            [[ "$t" == bpd && " ${TASK_LIST[*]} " == *" dump "* ]] && continue  # dump writes bpd.json
            JOBS+=("--checkpoint $CKPT --task $t --data $spec${DR:+ ${DR[*]}}${CONVERT:+ ${CONVERT[*]}}")
        done
    done
    for t in "${RUN_TASK_LIST[@]}"; do JOBS+=("--checkpoint $CKPT --task $t --data $IN${DR:+ ${DR[*]}}"); done
    ((${#JOBS[@]})) || die "no evaluation work: --tasks and --run-tasks are empty (or pass --only train)"
fi
JOBLIST="$RUN_DIR/slurm/eval-jobs.txt"
FIG=(--run "$RUN_DIR" --in "$IN" --train-split "$TRAIN_SPLIT")
for o in "${OOD[@]}"; do FIG+=(--ood "$o"); done
[[ -n "$DATA_ROOT" ]] && FIG+=(--data-root "$DATA_ROOT")
# eval_command DEPENDENCY, figures_command DEPENDENCY: the sbatch lines (no dependency: "").
eval_command() {
    EVAL_CMD=(sbatch "${COMMON[@]}" "${EVAL_OPTS[@]}" --array="0-$((${#JOBS[@]} - 1))")
    [[ -n "$1" ]] && EVAL_CMD+=(--dependency=afterok:"$1")
    EVAL_CMD+=(--job-name="glow-eval-$NAME" --output="$RUN_DIR/logs/eval-%A_%a.out" slurm/eval.sbatch "${JOBS[@]}")
}
figures_command() {
    FIG_CMD=(sbatch "${COMMON[@]}" "${FIG_OPTS[@]}")
    [[ -n "$1" ]] && FIG_CMD+=(--dependency=afterok:"$1")
    FIG_CMD+=(--job-name="glow-figures-$NAME" --output="$RUN_DIR/logs/figures-%j.out" slurm/figures.sbatch "${FIG[@]}")
}

show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

if ((DRY)); then
    echo "# dry run: nothing submitted"
    has train && show "${TRAIN[@]}"
    if has eval; then
        echo "# evaluation: ${#JOBS[@]} array tasks (also written to $JOBLIST); task i runs"
        echo "#   python -m glow.cli.launch ... $GLOW_EVAL_SCRIPT <item i>, i.e."
        for i in "${!JOBS[@]}"; do printf '#   task %d: %s %s\n' "$i" "$GLOW_EVAL_SCRIPT" "${JOBS[$i]}"; done
        if has train; then eval_command TRAIN_JOB_ID; else eval_command ""; fi
        show "${EVAL_CMD[@]}"
    fi
    if has figures; then
        if has eval; then figures_command EVAL_JOB_ID; else figures_command ""; fi
        show "${FIG_CMD[@]}"
        echo "# figures job runs: $(show python "$GLOW_FIGURES_SCRIPT" "${FIG[@]}")"
    fi
    exit 0
fi

mkdir -p "$RUN_DIR/logs" "$RUN_DIR/slurm"
TRAIN_ID="" EVAL_ID=""
if has train; then
    TRAIN_ID=$("${TRAIN[@]}") || exit 1
    TRAIN_ID=${TRAIN_ID%%;*}
    echo "train   $TRAIN_ID  (log: $RUN_DIR/logs/train-$TRAIN_ID.out)"
fi
if has eval; then
    # For people only (the array gets its items as arguments): a temporary file renamed over
    # the list, so a link planted at the list's name is replaced, never written through.
    TMP=$(mktemp "$RUN_DIR/slurm/.eval-jobs.XXXXXX")
    printf '%s\n' "${JOBS[@]}" >"$TMP"
    chmod "$(printf '%o' $((0666 & ~8#$(umask))))" "$TMP"
    mv -f -T "$TMP" "$JOBLIST"
    eval_command "$TRAIN_ID"
    EVAL_ID=$("${EVAL_CMD[@]}") || exit 1
    EVAL_ID=${EVAL_ID%%;*}
    echo "eval    $EVAL_ID  (${#JOBS[@]} tasks, list: $JOBLIST)"
fi
if has figures; then
    figures_command "$EVAL_ID"
    FIG_ID=$("${FIG_CMD[@]}") || exit 1
    FIG_ID=${FIG_ID%%;*}
    echo "figures $FIG_ID  (output: $RUN_DIR/figures/)"
fi
