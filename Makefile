# The two set-up commands: `make demo` and `make test`. Both create .venv when missing and install
# the project (editable) with the extras they use: demo -> .[demo], test -> .[test] (a superset).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test          # what `make install` installs, e.g. EXTRAS=eval,wandb,deepspeed on a cluster
PIP_CONSTRAINTS ?=      # e.g. constraints.txt: the versions behind the README's measured numbers
PYTEST_ARGS ?=
# The suite runs on TEST_WORKERS processes (pytest-xdist); the Slurm tests stay together on one of them
# (xdist_group "slurm"), beside the others. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

# The demo: every step skips or resumes what is already done. Override for a quick run, e.g.
#   make demo DEMO_STEPS=50 DEMO_N_TRAIN=2000 DEMO_N_TEST=500 DEMO_DATA=/tmp/d DEMO_RUNS=/tmp/r
# A variant gets its own shard directory (other sizes: data/shards-n<train>-<test>) and run
# (runs/demo[-n<train>-<test>][-steps<N>]), so it neither clashes with nor resumes the default demo.
DEMO_STEPS ?=
DEMO_N_TRAIN ?= 20000
DEMO_N_TEST ?= 2000
DEMO_SIZE_TAG := $(if $(filter-out 20000-2000,$(DEMO_N_TRAIN)-$(DEMO_N_TEST)),-n$(DEMO_N_TRAIN)-$(DEMO_N_TEST))
DEMO_DATA ?= data/shards$(DEMO_SIZE_TAG)
DEMO_RUNS ?= runs
DEMO_NAME ?= demo$(DEMO_SIZE_TAG)$(if $(DEMO_STEPS),-steps$(DEMO_STEPS))
DEMO_FID ?= 0
DEMO_FID_SAMPLES ?= 1000
DEMO_OVERRIDES ?=
# glow's launcher: the arguments of `accelerate launch`, and a user error keeps its exit code
# (2 usage, 4 data, 5 checkpoint) and its one-line message instead of a launcher traceback.
CPU_LAUNCH := ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 $(PY) -m glow.cli.launch \
	--config_file train/accelerate/cpu_2proc.yaml
DEMO_RUN_DIR := $(DEMO_RUNS)/$(DEMO_NAME)
DEMO_EVAL := eval/evaluate.py --checkpoint $(DEMO_RUN_DIR)/checkpoints/latest --data-root $(DEMO_DATA)

.PHONY: test demo demo-features install clean-venv

# One stamp per set of extras ($(VENV)/.installed-demo, -test, ...); pyproject.toml changes reinstall.
# The test extra holds the demo's, so it stamps both (the suite runs `make demo`).
$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(strip $(PIP_CONSTRAINTS)),-c $(strip $(PIP_CONSTRAINTS))) -e '.[$*]'
	touch $@ $(VENV)/.installed $(if $(filter test,$*),$(VENV)/.installed-demo)

install: $(VENV)/.installed-$(strip $(EXTRAS))

test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

demo: $(VENV)/.installed-demo
	$(PY) shards/build.py demo --out $(DEMO_DATA) --n-train $(DEMO_N_TRAIN) --n-test $(DEMO_N_TEST) --workers 2
	$(CPU_LAUNCH) train/train.py --config train/configs/demo.yaml run.name=$(DEMO_NAME) \
		run.root=$(DEMO_RUNS) data.root=$(DEMO_DATA) $(if $(DEMO_STEPS),train.max_steps=$(DEMO_STEPS)) $(DEMO_OVERRIDES)
	$(CPU_LAUNCH) $(DEMO_EVAL) --task dump --task samples --task latents \
		--data demo/train --data demo/test --data digits/test
	@if [ "$(DEMO_FID)" = 1 ]; then \
		$(PY) $(DEMO_EVAL) --task fid --data demo/test --fid-samples $(DEMO_FID_SAMPLES); \
	else \
		$(PY) -c "from glow.evaluation.fid import inception_weights_path as p; p()" 2>/dev/null \
		&& echo "FID skipped (slow on a CPU): run 'make demo DEMO_FID=1' to compute it." \
		|| echo "FID skipped: no Inception weights. Put pt_inception-2015-12-05-6726825d.pth in \$$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), then run 'make demo DEMO_FID=1'."; \
	fi
	$(PY) eval/figures.py --run $(DEMO_RUN_DIR) --in demo/test --ood digits/test --data-root $(DEMO_DATA)
	@echo "Run directory $(DEMO_RUN_DIR): checkpoints/, samples/, eval/, figures/ (open figures/index.html)."

# The flow on features (Kirichenko et al. 2020, section 8) on the demo, with FID's Inception-v3
# RANDOMLY INITIALISED (no weights needed: a smoke test of the pipeline, not the paper's features):
# smaller demo shards (extraction runs Inception at 299x299 on a CPU), features, a flow on them,
# dumps, and the OOD table with intervals. Every step skips or resumes what is done.
FEATURES_N_TRAIN ?= 2000
FEATURES_N_TEST ?= 500
FEATURES_IMAGES ?= data/shards-n$(FEATURES_N_TRAIN)-$(FEATURES_N_TEST)
FEATURES_DATA ?= data/features-demo-n$(FEATURES_N_TRAIN)-$(FEATURES_N_TEST)
FEATURES_RUN ?= demo_features-n$(FEATURES_N_TRAIN)-$(FEATURES_N_TEST)
FEATURES_SPLITS := --split demo/train --split demo/test --split digits/test

demo-features: $(VENV)/.installed-demo
	$(PY) shards/build.py demo --out $(FEATURES_IMAGES) --n-train $(FEATURES_N_TRAIN) --n-test $(FEATURES_N_TEST) \
		--samples-per-shard 250 --workers 2
	$(CPU_LAUNCH) -m glow.cli.shards features --from $(FEATURES_IMAGES) $(FEATURES_SPLITS) --extractor inception \
		--random-init 0 --weights $(FEATURES_IMAGES)-inception-random-seed0.pth --out $(FEATURES_DATA)
	$(CPU_LAUNCH) train/train.py --config train/configs/demo_features.yaml run.name=$(FEATURES_RUN) \
		run.root=$(DEMO_RUNS) data.root=$(FEATURES_DATA) $(DEMO_OVERRIDES)
	$(CPU_LAUNCH) eval/evaluate.py --checkpoint $(DEMO_RUNS)/$(FEATURES_RUN)/checkpoints/latest \
		--data-root $(FEATURES_DATA) --task dump --data demo/train --data demo/test --data digits/test
	$(PY) eval/figures.py --run $(DEMO_RUNS)/$(FEATURES_RUN) --in demo/test --ood digits/test
	@echo "Run directory $(DEMO_RUNS)/$(FEATURES_RUN): figures/ood.md (features of a RANDOMLY INITIALISED Inception)."

clean-venv:
	rm -rf $(VENV)
