# PTG-RM pipeline: `make features TASK=deblur && make train`, `make test`. See README.md.
# Each variable maps 1:1 to a CLI flag of `python -m pipeline` / `python -m training`;
# empty ones fall back to the CLI's defaults.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

TASK ?= deblur
DATA ?= demo
TARGET ?=
ENCODER ?= clip-vit-b32
STORE_ROOT ?= data/stores
STORE_SHARED ?=
RUN ?= $(TASK)
STEPS ?=
SHARDS ?=
CLIP_WEIGHTS ?=
SEED ?=
RESUME ?=
LOSS ?=
EXPOSURE ?=
IN ?=
OUT ?=
OSF ?=
FORMAT ?=
TRAIN_STORE ?=
TEST_STORE ?=
TARGET_WEIGHTS ?=
TARGET_BUDGET_MB ?=
TARGET_COMPILE ?=
SD_WEIGHTS ?=
ALLOW_RANDOM_WEIGHTS ?=
SPLITS ?=
STORE ?=
SRC ?=
DST ?=
NAME ?=
CODEC ?=
PRECISION ?=
V ?=

flag = $(if $(strip $(2)),$(1) $(2))
COMMON := $(V) --task $(TASK) --data $(DATA) --encoder $(ENCODER) --store-root $(STORE_ROOT) \
	$(call flag,--target,$(TARGET))
FEATURES_FLAGS := $(COMMON) $(call flag,--shards,$(SHARDS)) $(call flag,--clip-weights,$(CLIP_WEIGHTS)) \
	$(call flag,--target-weights,$(TARGET_WEIGHTS)) $(call flag,--sd-weights,$(SD_WEIGHTS)) \
	$(call flag,--target-budget-mb,$(TARGET_BUDGET_MB)) $(if $(strip $(TARGET_COMPILE)),--target-compile) \
	$(call flag,--encoder-dtype,$(ENCODER_DTYPE)) $(call flag,--batch,$(BATCH)) \
	$(call flag,--store-shared,$(STORE_SHARED)) $(call flag,--splits,$(SPLITS)) \
	$(if $(strip $(ALLOW_RANDOM_WEIGHTS)),--allow-random-weights) $(if $(filter wds,$(FORMAT)),--wds)
TRAIN_FLAGS := $(COMMON) --run $(RUN) $(call flag,--steps,$(STEPS)) $(call flag,--seed,$(SEED)) $(call flag,--loss,$(LOSS)) $(call flag,--exposure,$(EXPOSURE)) $(call flag,--precision,$(PRECISION)) \
	$(if $(strip $(RESUME)),--resume) $(call flag,--format,$(FORMAT)) \
	$(call flag,--train-store,$(TRAIN_STORE)) $(call flag,--test-store,$(TEST_STORE))

.PHONY: features weights train eval restore distill ablate prior-study push pull export-wds bench bench-scale stress test lint install clean-runs help

help:
	@echo "make features TASK=deblur [DATA=demo|folder] [TARGET=] [ENCODER=clip-vit-b32] [STORE_ROOT=data/stores] [SHARDS=] [CLIP_WEIGHTS=] [SPLITS=train,test] [TARGET_BUDGET_MB=1024] [TARGET_COMPILE=1] [ENCODER_DTYPE=fp32|bf16] [BATCH=] [ALLOW_RANDOM_WEIGHTS=1]"
	@echo "features, train, eval, distill, ablate, prior-study: V=-v (details) | V=-q (warnings only, no progress bars) | V=-qq (errors only)"
	@echo "make weights NAME=clip-vit-b32|restormer-deblur|...   (download a published checkpoint when online)"
	@echo "make train    TASK=deblur [RUN=deblur] [STEPS=] [SEED=] [RESUME=1] [LOSS=charbonnier|zerodce|sci] [EXPOSURE=0.6] [FORMAT=wds] [TRAIN_STORE=] [TEST_STORE=]"
	@echo "make eval     TASK=deblur RUN=deblur"
	@echo "make restore  IN=degraded/ OUT=restored/ RUN=deblur [CLIP_WEIGHTS=] [OSF=encoder|distilled]"
	@echo "make distill  TASK=deblur RUN=deblur     (OSF predictor: inference without CLIP)"
	@echo "make ablate   TASK=deblur [STEPS=]       (the paper's Table 3 on your data)"
	@echo "make prior-study TASK=deblur [SEEDS=0,1,2] [STEPS=] [JOBS=1]  (no OSF / random CLIP / pre-trained EfficientNet-Lite0 / both)"
	@echo "make push STORE=data/stores/<store> DST=s3://bucket/prefix | make pull SRC=... | make export-wds STORE=... [CODEC=zstd|png]"
	@echo "make slurm-features TASK=deblur SHARDS=64 [PARTITION= ACCOUNT= GPUS= TIME=] | make slurm-train TASK=deblur"
	@echo "make slurm-up | make slurm-down   (a local single-node SLURM cluster, root on Debian)"
	@echo "make bench    (benchmarks: bench/results.json; bench/gpu.sh on a GPU machine)"
	@echo "make bench-scale   (stores and loaders at dataset sizes, CPU sharing: bench/results-scale.json)"
	@echo "make stress [ROUNDS=20]   (fault tolerance: kills, full disk, damaged manifests: bench/results-stress.json)"
	@echo "make test | make lint   (the test suite; ruff lint, import order and format)"

# The project virtualenv, created on first use. torch/torchvision are pinned exactly
# (pyproject.toml): a range would let pip download several GB of other CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

features: $(VENV)/.installed
	$(PY) -m pipeline features $(FEATURES_FLAGS)

weights: $(VENV)/.installed
	@test -n "$(NAME)" || { echo "usage: make weights NAME=clip-vit-b32 (an encoder or a built-in target)"; exit 2; }
	$(PY) -m pipeline weights get $(NAME)

train: $(VENV)/.installed
	$(PY) -m training train $(TRAIN_FLAGS)

eval: $(VENV)/.installed
	$(PY) -m training eval $(COMMON) --run $(RUN)

restore: $(VENV)/.installed
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "usage: make restore IN=folder OUT=folder RUN=run"; exit 2; }
	$(PY) -m pipeline restore --in $(IN) --out $(OUT) --run $(RUN) $(call flag,--clip-weights,$(CLIP_WEIGHTS)) \
		$(call flag,--osf,$(OSF)) $(call flag,--target-weights,$(TARGET_WEIGHTS)) $(call flag,--target,$(TARGET)) \
		--encoder $(ENCODER)

distill: $(VENV)/.installed
	$(PY) -m training distill $(COMMON) --run $(RUN)

ablate: $(VENV)/.installed
	$(PY) -m training ablate $(TRAIN_FLAGS)

# Does the pre-trained prior matter? Both OSF members first (each computed once), then 4 rows x SEEDS runs.
SEEDS ?= 0,1,2
JOBS ?= 1
prior-study: $(VENV)/.installed
	$(PY) -m pipeline features $(FEATURES_FLAGS) --encoder clip-vit-b32,effnet-lite0
	$(PY) -m training prior-study $(TRAIN_FLAGS) --seeds $(SEEDS) --jobs $(JOBS)

push: $(VENV)/.installed
	@test -n "$(STORE)" -a -n "$(DST)" || { echo "usage: make push STORE=data/stores/<store> DST=s3://bucket/prefix"; exit 2; }
	$(PY) -m stores push $(STORE) $(DST)

pull: $(VENV)/.installed
	@test -n "$(SRC)" || { echo "usage: make pull SRC=s3://bucket/prefix/<store> [STORE_ROOT=data/stores]"; exit 2; }
	$(PY) -m stores pull $(SRC) $(STORE_ROOT)

export-wds: $(VENV)/.installed
	@test -n "$(STORE)" || { echo "usage: make export-wds STORE=data/stores/<store> [CODEC=zstd|png]"; exit 2; }
	$(PY) -m stores export-wds $(STORE) $(call flag,--codec,$(CODEC))

bench: $(VENV)/.installed
	$(PY) bench/run.py

# Stores and loaders at real dataset sizes (synthetic GoPro-, Rain13K- and SIDD-like sets at N, 2N,
# 4N) and two trainings sharing the CPUs: bench/results-scale.json. The sharing rows need the demo
# stores (make features TASK=deblur) under STORE_ROOT.
bench-scale: $(VENV)/.installed
	$(PY) bench/scale.py --store-root $(STORE_ROOT)

# Fault tolerance with real processes (bench/stress.py): concurrent writers with SIGKILLs, a full
# disk, kills during finalize/push/pull/export-wds, damaged manifests, a paused lease holder.
# ROUNDS: kill rounds of the 4 writers (default 20). Writes bench/results-stress.json.
ROUNDS ?=
stress: $(VENV)/.installed
	$(PY) bench/stress.py $(call flag,--rounds,$(ROUNDS))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed slurm-up-if-possible
	$(PY) -m pytest -q tests

# SLURM (slurm/): a local single-node cluster for tests and demos, and the cluster launchers.
# PARTITION, ACCOUNT, GPUS, TIME (minutes), MAX_PARALLEL, LOGS map to `python -m slurm` flags.
PARTITION ?=
ACCOUNT ?=
GPUS ?=
TIME ?=
MAX_PARALLEL ?=
LOGS ?=
SLURM_FLAGS := $(call flag,--partition,$(PARTITION)) $(call flag,--account,$(ACCOUNT)) \
	$(call flag,--gpus,$(GPUS)) $(call flag,--time,$(TIME)) $(call flag,--max-parallel,$(MAX_PARALLEL)) \
	$(call flag,--logs,$(LOGS))

.PHONY: slurm-up slurm-down slurm-up-if-possible slurm-features slurm-train

slurm-up:
	bash slurm/cluster.sh up

slurm-down:
	bash slurm/cluster.sh down

# `make test` starts the local cluster when it can (root with apt, or SLURM already installed);
# otherwise the SLURM tests skip and say why.
slurm-up-if-possible:
	@if [ "$$(id -u)" != 0 ]; then echo "slurm: not root, not starting the local cluster (SLURM tests will skip)"; \
	elif ! command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		echo "slurm: no apt-get and no SLURM installed, not starting the local cluster (SLURM tests will skip)"; \
	else bash slurm/cluster.sh up || echo "slurm: the local cluster did not start (SLURM tests will skip)"; fi

slurm-features: $(VENV)/.installed
	$(PY) -m slurm features $(FEATURES_FLAGS) $(SLURM_FLAGS)

slurm-train: $(VENV)/.installed
	$(PY) -m slurm train $(TRAIN_FLAGS) $(SLURM_FLAGS)

clean-runs:
	rm -rf runs
