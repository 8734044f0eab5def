# Transfer learning on cached features. `make help` lists targets and variables.
# Make only passes variables on as CLI flags; all logic lives in `python -m pipeline`.

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
SHELL := /bin/bash

## Options: each is passed on as its flag (`SEED=3` -> `--seed '3'`) only when set, so the
## defaults live in one place, pipeline/config.py; `make help` prints them from there.
DATA_OPTIONS := DATASET DATA_DIR LABELS TFDS_DIR NO_DOWNLOAD SPLITS VAL_FRACTION TEST_FRACTION TEST_FROM_VALIDATION
FEATURES_OPTIONS := BACKBONE WEIGHTS IMAGE_SIZE POOLING DTYPE BATCH_SIZE SEED SHARD NUM_SHARDS STRICT \
	MIXED_PRECISION RUNTIME PRECISION FEATURES_DIR
AUGMENT_OPTIONS := AUG_FLIP AUG_ROTATION AUG_ZOOM AUG_CONTRAST AUG_TRANSLATION
VIEWS_OPTIONS := AUG_VIEWS
HEAD_OPTIONS := HEAD C HIDDEN DROPOUT EPOCHS HEAD_BATCH_SIZE LEARNING_RATE PATIENCE CLASS_WEIGHT RUNS_DIR \
	GRID_IMAGES VIEWS TRAIN_PER_CLASS EXCLUDE EXCLUDE_KINDS MEMORY_BUDGET
FINETUNE_OPTIONS := FINE_TUNE_AT FINE_TUNE_EPOCHS HEAD_EPOCHS OPTIMIZER FINE_TUNE_LEARNING_RATE \
	FINE_TUNE_BATCH_SIZE FINE_TUNE_PATIENCE FROM_SCRATCH
ENGINE_OPTIONS := ENGINE RAY_ADDRESS WORKERS GPUS_PER_WORKER RAY_SHARD_SIZE RAY_MAX_ATTEMPTS
CHOOSE_OPTIONS := BACKBONES PER_CLASS CHOOSE_WEIGHTS CHOOSE_TOLERANCE CHOOSE_DIR
AUDIT_OPTIONS := FOLDS DUPLICATE_THRESHOLD NEIGHBOURS OUTLIER_Z AUDIT_TOP AUDIT_BLOCK_ROWS EXACT_BELOW \
	AUDIT_PCA_DIM AUDIT_NPROBE AUDIT_RERANK RECALL_QUERIES
DECISIONS_OPTIONS := AUDIT_DIR DECISIONS DECISIONS_TEST
REVIEW_OPTIONS := PORT
## Command arguments
FEATURES ?=#                      head, audit, ...: a feature file to use instead of the one the options describe
## Compare
COMPARE_ROWS ?=#                  rows of `make compare`, comma-separated (default: the five of pipeline.compare.ROWS; also seed, dense-views-K, logistic-views-K)
COMPARE_DIR ?=#                   default: compare/<data>__<backbone>__<size>px[__<N>-per-class]
## Export features
FORMAT ?=#                        export-features: parquet (default) or npy (embeddings + Parquet metadata)
EXPORT_OUT ?=#                    export-features: output file (default: FEATURES_DIR/export/<feature file>.<format>)
## Export and predict
RUN ?=#                           a run directory (default: the one the variables above describe)
TFLITE ?=#                        1: also export model.tflite
IMAGES ?=#                        predict, similar: image files, folders or globs, space-separated (a path with spaces works as it is)
TOP ?=#                           predict: classes shown per image (default: 3); similar: matches (default: 10)
CSV ?=#                           predict: also write probabilities to this CSV file
## Tools
PYTHON ?= python3#                interpreter used to create the virtual environment
VENV ?= .venv
SHARED ?= ../shared#              real assets for the asset tests and benchmarks
PYTEST_ARGS ?=
TEST_WORKERS ?= 2#                pytest-xdist processes for make test (files stay whole: fixtures are built once per file)
VERBOSE ?=#                       1: debug logging and TensorFlow's own INFO/WARNING logs
## Benchmarks: each BENCH_* variable is passed on as its flag only when set; the defaults live in
## pipeline/bench/settings.py (`make help` prints them). BENCH_DATA and BENCH_WEIGHTS are the SHARED assets.
BENCH_DATA ?= $(SHARED)/assets/datasets/cats_and_dogs_filtered
BENCH_WEIGHTS ?= $(SHARED)/assets/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
BENCH_SECOND_DATA ?= sklearn:digits#  make bench-precision: a second dataset (an image folder, or sklearn:digits, bundled with scikit-learn)
BENCH_BACKBONE ?=#                benchmarks: backbone (registry name)
BENCH_IMAGE_SIZE ?=#              benchmarks: pixels
BENCH_EPOCHS ?=#                  make bench: epochs of the seed workflow
BENCH_QUICK ?=#                   1: make bench on a tiny backbone and generated images (CI, about a minute)
BENCH_SCALE_PARTS ?=#             make bench-scale: the parts to run, comma-separated (results of the others are kept)
BENCH_SCALE_FLAGS ?=#             make bench-scale: more flags (`python -m pipeline bench-scale --help`)
BENCH_OUT ?=#                     benchmarks: results folder

PY := $(VENV)/bin/python
PIPELINE = $(PY) -m pipeline $(if $(VERBOSE),--verbose)
lower = $(subst Z,z,$(subst Y,y,$(subst X,x,$(subst W,w,$(subst V,v,$(subst U,u,$(subst T,t,$(subst S,s,$(subst R,r,$(subst Q,q,$(subst P,p,$(subst O,o,$(subst N,n,$(subst M,m,$(subst L,l,$(subst K,k,$(subst J,j,$(subst I,i,$(subst H,h,$(subst G,g,$(subst F,f,$(subst E,e,$(subst D,d,$(subst C,c,$(subst B,b,$(subst A,a,$(1)))))))))))))))))))))))))))
# $(1) as one shell word: single-quoted, its own single quotes too ("Bob's photos").
q = '$(subst ','\'',$(1))'
# The flags of the options in $(1) that are set: VAR=value -> --var 'value'.
options = $(strip $(foreach v,$(1),$(if $($(v)),--$(subst _,-,$(call lower,$(v))) $(call q,$($(v))))))
FEATURE_FLAGS = $(call options,$(DATA_OPTIONS) $(FEATURES_OPTIONS))
STAGE2_FLAGS = $(FEATURE_FLAGS) $(call options,$(HEAD_OPTIONS) $(DECISIONS_OPTIONS)) $(if $(FEATURES),--features $(call q,$(FEATURES)))
# Stage 2 runs `make features` first, unless FEATURES names the file to use as it is.
STAGE2_NEEDS = $(if $(FEATURES),$(VENV)/.installed,features)
RUN_FLAGS = $(if $(RUN),--run $(call q,$(RUN)))
# VAR's value as FLAG, only when VAR is set: $(call flag,VAR,--flag).
flag = $(if $($(1)),$(2) $(call q,$($(1))))
BENCH_MODEL_FLAGS = $(call flag,BENCH_BACKBONE,--backbone) $(call flag,BENCH_IMAGE_SIZE,--image-size) $(call options,BATCH_SIZE)
BENCH_ASSET_FLAGS = $(call flag,BENCH_DATA,--data-dir) $(call flag,BENCH_WEIGHTS,--weights) $(BENCH_MODEL_FLAGS)
BENCH_OUT_FLAGS = $(call flag,BENCH_OUT,--out)

.PHONY: lint help features gc export-features head audit similar review finetune compare export predict backbones choose \
	bench bench-features bench-head bench-audit bench-scale bench-runtimes bench-precision bench-incremental test test-all \
	test-browser-deps clean-venv

help: ## list targets and variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "Options (make TARGET VAR=value; defaults from pipeline/config.py):"
	@PYTHONPATH=. $(PYTHON) -m pipeline options
	@echo "Benchmark settings (BENCH_* variables; defaults from pipeline/bench/settings.py):"
	@PYTHONPATH=. $(PYTHON) -m pipeline bench-options
	@echo "Other variables:"
	@grep -E '^[A-Z_]+ \?=' $(MAKEFILE_LIST) | sed -E 's/ \?= ?/=/; s/#\s*/\t/' | awk -F'\t' '{printf "  %-32s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray,hub]'
	touch $@

features: $(VENV)/.installed ## stage 1: run the frozen backbone once, cache features to HDF5 in FEATURES_DIR
	$(PIPELINE) features $(FEATURE_FLAGS) $(call options,$(AUGMENT_OPTIONS) $(VIEWS_OPTIONS) $(ENGINE_OPTIONS))

gc: $(VENV)/.installed ## drop feature-store rows no feature file in FEATURES_DIR uses any more (and format-1 files)
	$(PIPELINE) gc $(if $(FEATURES_DIR),--features-dir $(call q,$(FEATURES_DIR)))

export-features: $(STAGE2_NEEDS) ## the current features as Parquet (FORMAT=parquet) or .npy + Parquet (FORMAT=npy)
	$(PIPELINE) export-features $(STAGE2_FLAGS) $(if $(FORMAT),--format $(call q,$(FORMAT))) $(if $(EXPORT_OUT),--out $(call q,$(EXPORT_OUT)))

head: $(STAGE2_NEEDS) ## stage 2: train HEAD on the cached features; metrics, plots and report in RUNS_DIR
	$(PIPELINE) head $(STAGE2_FLAGS)

audit: $(STAGE2_NEEDS) ## duplicates (leaks first), label errors, outliers, class overlap -> AUDIT_DIR/<features>/audit.{json,md}, contact sheets
	$(PIPELINE) audit $(STAGE2_FLAGS) $(call options,$(AUDIT_OPTIONS))

review: $(VENV)/.installed ## a page on localhost over the latest audit (or AUDIT_DIR): keep/exclude/relabel -> AUDIT_DIR/<dataset>.decisions.csv
	$(PIPELINE) review $(call options,$(DECISIONS_OPTIONS) $(REVIEW_OPTIONS))

# --make-head: a warm start runs stages 1 and 2 first (no-ops when up to date); the finetune
# command decides when that is needed (FinetuneConfig.warm_starts), not Make.
finetune: $(VENV)/.installed ## stage 3: augmented fine-tuning of the top of the backbone, warm-started from the head
	$(PIPELINE) finetune --make-head $(STAGE2_FLAGS) $(RUN_FLAGS) $(call options,$(AUGMENT_OPTIONS) $(FINETUNE_OPTIONS))

compare: $(VENV)/.installed ## cached heads vs fine-tuning the top block / everything vs from scratch (+ views, seed workflow): table and plots
	$(PIPELINE) compare $(STAGE2_FLAGS) $(call options,$(AUGMENT_OPTIONS) $(FINETUNE_OPTIONS)) \
		$(if $(COMPARE_ROWS),--rows $(call q,$(COMPARE_ROWS))) $(if $(COMPARE_DIR),--out $(call q,$(COMPARE_DIR)))

export: head ## one Keras model, raw images in and probabilities out (.keras, SavedModel, TFLITE=1) in RUN/export
	$(PIPELINE) export $(STAGE2_FLAGS) $(RUN_FLAGS) $(if $(TFLITE),--tflite)

similar: $(VENV)/.installed ## nearest dataset images of IMAGES (every copy of a bad one) from the audit's neighbour graph [TOP=10]
	$(PIPELINE) similar $(FEATURE_FLAGS) $(if $(FEATURES),--features $(call q,$(FEATURES))) $(call options,$(DECISIONS_OPTIONS) $(AUDIT_OPTIONS)) $(if $(TOP),--top $(TOP)) $(if $(IMAGES),"$$IMAGES")

predict: $(VENV)/.installed ## top classes per image: make predict IMAGES=<file, folder or glob> [CSV=out.csv]
	$(PIPELINE) predict $(STAGE2_FLAGS) $(RUN_FLAGS) $(if $(TOP),--top $(TOP)) $(if $(CSV),--csv $(call q,$(CSV))) $(if $(IMAGES),"$$IMAGES")

bench-features: $(VENV)/.installed ## benchmark stage 1 (throughput vs bare forward pass, peak memory) -> bench/features.{json,md}
	$(PIPELINE) bench-features $(BENCH_ASSET_FLAGS) $(BENCH_OUT_FLAGS)

# bench-head and bench-audit extract the benchmark's features first when they are not cached.
bench-head: $(VENV)/.installed ## benchmark stage 2: head training seconds on the benchmark's cached features -> bench/head.{json,md}
	$(PIPELINE) bench-head $(BENCH_ASSET_FLAGS) $(call options,FEATURES_DIR) $(BENCH_OUT_FLAGS)

bench-audit: $(VENV)/.installed ## audit seconds, peak memory and recall at 10k/100k/1M generated rows; duplicate threshold calibrated on BENCH_DATA -> bench/audit.{json,md}
	$(PIPELINE) bench-audit $(BENCH_ASSET_FLAGS) $(call options,FEATURES_DIR) $(BENCH_OUT_FLAGS)

# Quick mode generates its own data and backbone, so it takes none of the asset variables.
bench: $(VENV)/.installed ## pipeline vs the seed workflow: speed, accuracy, storage, memory -> bench/results.{json,md}
	$(PIPELINE) bench $(if $(filter-out 0,$(BENCH_QUICK)),--quick $(call options,BATCH_SIZE),$(BENCH_ASSET_FLAGS)) \
		$(call flag,BENCH_EPOCHS,--epochs) $(BENCH_OUT_FLAGS)

bench-scale: $(VENV)/.installed ## ENGINE=ray vs local, the driver's ceiling, extraction and heads against size -> bench/scale.{json,md}
	$(PIPELINE) bench-scale $(call flag,BENCH_SCALE_PARTS,--parts) $(BENCH_ASSET_FLAGS) $(BENCH_OUT_FLAGS) $(BENCH_SCALE_FLAGS)

BENCH_INCREMENTAL_FLAGS ?=#       make bench-incremental: more flags (`python -m pipeline bench-incremental --help`)

bench-incremental: $(VENV)/.installed ## no-op and +1% runs of make features on 100k generated images -> bench/incremental.{json,md}
	$(PIPELINE) bench-incremental $(BENCH_INCREMENTAL_FLAGS)

bench-runtimes: $(VENV)/.installed ## stage 1 on each runtime x precision at 160 and 224 px: img/s, ratio to TF, cosine, peak RSS -> bench/runtimes.{json,md}
	$(PIPELINE) bench-runtimes $(call flag,BENCH_DATA,--data-dir) $(call flag,BENCH_WEIGHTS,--weights) \
		$(call flag,BENCH_BACKBONE,--backbone) $(call options,BATCH_SIZE) $(BENCH_OUT_FLAGS)

bench-precision: $(VENV)/.installed ## logistic-probe accuracy of PRECISION=bf16 vs f32 on BENCH_DATA and BENCH_SECOND_DATA (paired k-fold) -> bench/precision.{json,md}
	$(PIPELINE) bench-precision --data $(BENCH_DATA) $(BENCH_SECOND_DATA) $(call flag,BENCH_WEIGHTS,--weights) \
		$(call flag,BENCH_BACKBONE,--backbone) $(BENCH_OUT_FLAGS)

backbones: $(VENV)/.installed ## list the registered backbones, the runtimes each runs on, and keras-hub presets (BACKBONE=hub:<preset>)
	$(PIPELINE) backbones

choose: $(VENV)/.installed ## which backbone: BACKBONES=a,b,c [PER_CLASS=n] on a sample -> CHOOSE_DIR/<data>/choose.{md,json,png}
	$(PIPELINE) choose $(FEATURE_FLAGS) $(call options,$(CHOOSE_OPTIONS))

test: $(VENV)/.installed ## run the test suite (real-asset tests skip when SHARED is absent)
	PIPELINE_SHARED=$(call q,$(SHARED)) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed ## check formatting, imports and style with ruff (line length 120)
	$(PY) -m ruff check pipeline tests
	$(PY) -m ruff format --check pipeline tests

test-all: $(VENV)/.installed ## the test suite including slow tests
	PIPELINE_SHARED=$(call q,$(SHARED)) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --runslow $(PYTEST_ARGS)

test-browser-deps: $(VENV)/.installed ## install what the review page's browser tests need: Chromium, chromedriver, selenium
	apt-get install -y chromium chromium-driver
	$(PY) -m pip install --quiet -e '.[test,ray,hub,browser]'

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
