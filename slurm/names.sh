# shellcheck shell=bash
# Checks of the values slurm/submit.sh writes into commands and job lists, with the
# character set of glow/names.py (NAME_RE): a name is 1-128 letters, digits, '.', '_' or
# '-', starting with a letter or digit (so never '.', '..', a path, whitespace, a glob or
# an option); a spec is NAME/NAME. Paths (data root, run root) may hold '/' too, but no
# whitespace, glob or quote characters and no leading '-'. Sourced by submit.sh and
# eval.sbatch; tests/test_submit.py checks it agrees with glow.names.

GLOW_NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
GLOW_PATH_RE='^[A-Za-z0-9._/~+@:=,][A-Za-z0-9._/~+@:=,-]*$'
GLOW_EVAL_TASKS=(dump bpd samples fid latents)

# valid_name VALUE: a safe single path component (glow.names.check_name).
valid_name() { [[ "$1" =~ $GLOW_NAME_RE ]]; }

# valid_spec VALUE: DATASET/SPLIT, both valid names (glow.names.parse_spec).
valid_spec() {
    [[ "$1" == */* ]] || return 1
    local dataset=${1%%/*} split=${1#*/}
    valid_name "$dataset" && valid_name "$split"
}

# valid_path VALUE: a path without whitespace, glob, quote or shell characters, not an option.
valid_path() { [[ "$1" =~ $GLOW_PATH_RE ]]; }

# valid_task VALUE: one of the tasks of eval/evaluate.py.
valid_task() {
    local t
    for t in "${GLOW_EVAL_TASKS[@]}"; do [[ "$1" == "$t" ]] && return 0; done
    return 1
}
