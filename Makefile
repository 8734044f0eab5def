# Transfer learning on cached features. `make help` lists targets and variables.
# Make only passes variables on as CLI flags; all logic lives in `python -m pipeline`.

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
SHELL := /bin/bash

## Data
DATASET ?= cats_vs_dogs#          tensorflow-datasets name (ignored when DATA_DIR is set)
DATA_DIR ?=#                      image folder: one sub-folder per class, or train/ validation/ [test/]
TFDS_DIR ?=#                      tensorflow-datasets data_dir (prepared data)
NO_DOWNLOAD ?=#                   1: never download tfds data (fail at once offline)
SPLITS ?=#                        tfds split specs, default train=train[:40%],validation=train[40%:50%],test=train[50%:60%]
VAL_FRACTION ?= 0.1#              image folder without split sub-folders
TEST_FRACTION ?= 0.1#             image folder without split sub-folders
TEST_FROM_VALIDATION ?= 0#        move this fraction of validation to test (TF tutorial: 0.2)
## Backbone
BACKBONE ?= mobilenet_v2#         `make backbones` lists them
WEIGHTS ?= imagenet#              imagenet, none, or a path to an .h5 file
IMAGE_SIZE ?=#                    pixels; default: the backbone's native size (160 reproduces the TF tutorial)
POOLING ?= avg#                   avg or max
## Run
BATCH_SIZE ?= 32
DTYPE ?= float32#                 storage dtype of the features: float32 or float16
SEED ?= 0
SHARD ?= 0#                       with NUM_SHARDS: process one shard (merge with `python -m pipeline merge`)
NUM_SHARDS ?= 1
STRICT ?=#                        1: fail on any unreadable image instead of skipping it
MIXED_PRECISION ?=#               1: run the backbone in float16 (GPUs)
FEATURES_DIR ?= features
ENGINE ?= local#                  make features: local (this process) or ray (a Ray cluster; RAY_ADDRESS=... for an existing one)
WORKERS ?=#                       ENGINE=ray: worker actors (default: one per GPU, else one)
GPUS_PER_WORKER ?=#               ENGINE=ray: GPUs per worker (default: 1 when the cluster has GPUs, else 0)
RAY_SHARD_SIZE ?= 1000#           ENGINE=ray: images per unit of work
## Head (stage 2)
HEAD ?= logistic#                 logistic (linear probe) or dense (Keras Dropout + Dense)
FEATURES ?=#                      a feature file to use instead of the one the variables above describe
C ?=#                             logistic: inverse regularization (default: chosen on validation)
HIDDEN ?= 0#                      dense: units of an optional hidden layer
DROPOUT ?= 0.2
EPOCHS ?= 20
HEAD_BATCH_SIZE ?= 32
LEARNING_RATE ?= 0.001
PATIENCE ?= 5#                    dense: early stopping on validation loss
CLASS_WEIGHT ?=#                  balanced: weight classes by inverse frequency
RUNS_DIR ?= runs
VIEWS ?=#                         augmented train views to train on (default: dense all the file has, logistic none; 0: none)
TRAIN_PER_CLASS ?=#               train on a seeded, stratified subset of N train examples per class (few-shot)
MEMORY_BUDGET ?=#                 memory the train rows may take, e.g. 2GB (default: a quarter of RAM); dense streams past it
## Augmentation (make finetune, and AUG_VIEWS in make features)
AUG_FLIP ?= horizontal#           horizontal, vertical, horizontal_and_vertical or none
AUG_ROTATION ?= 0.1#              fraction of a full turn (0.1: up to 36 degrees)
AUG_ZOOM ?= 0#                    fraction of the image side
AUG_CONTRAST ?= 0#                contrast factor
AUG_TRANSLATION ?= 0#             fraction of the image side
AUG_VIEWS ?= 0#                   make features: also cache K augmented views of every train image (seeded by SEED)
## Fine-tuning (stage 3; also uses LEARNING_RATE, DROPOUT, MIXED_PRECISION and AUG_*)
FINE_TUNE_AT ?= 100#              first trainable layer: index, layer name (prefix), blocks:N or all
FINE_TUNE_EPOCHS ?= 10
FINE_TUNE_LEARNING_RATE ?=#       default: 1e-5 with adam (Keras guide), LEARNING_RATE/10 otherwise (TF tutorial)
FINE_TUNE_BATCH_SIZE ?= 32
FINE_TUNE_PATIENCE ?= 3#          early stopping on validation loss, best epoch kept (0: never stop)
OPTIMIZER ?= adam#                adam, rmsprop or sgd
HEAD_EPOCHS ?= 0#                 N > 0: train a fresh head on images N epochs first instead of using `make head`
FROM_SCRATCH ?=#                  1: train everything from random weights (needs WEIGHTS=none)
## Compare
COMPARE_ROWS ?= logistic,dense,finetune-top,finetune-all,scratch#  rows of `make compare` (also: seed, dense-views-K, logistic-views-K)
COMPARE_DIR ?=#                   default: compare/<data>__<backbone>__<size>px[__<N>-per-class]
## Export and predict
RUN ?=#                           a run directory (default: the one the variables above describe)
TFLITE ?=#                        1: also export model.tflite
IMAGES ?=#                        predict: image files, folders or globs
TOP ?= 3#                         predict: classes shown per image
CSV ?=#                           predict: also write probabilities to this CSV file
## Tools
PYTHON ?= python3#                interpreter used to create the virtual environment
VENV ?= .venv
SHARED ?= ../shared#              real assets for the asset tests and benchmarks
PYTEST_ARGS ?=
## Benchmarks
BENCH_DATA ?= $(SHARED)/assets/datasets/cats_and_dogs_filtered
BENCH_WEIGHTS ?= $(SHARED)/assets/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
BENCH_BACKBONE ?= mobilenet_v2
BENCH_IMAGE_SIZE ?= 160
BENCH_EPOCHS ?= 10#               make bench: epochs of the seed workflow (the TF tutorial's 10)
BENCH_QUICK ?=#                   1: make bench on a tiny backbone and generated images, 2 epochs (CI, about a minute)
BENCH_OUT ?=#                     make bench: results folder (default: bench, quick mode bench/quick)
BENCH_SCALE_PARTS ?= engines,driver,extraction,heads#  make bench-scale: the parts to run (results of the others are kept)
BENCH_SCALE_FLAGS ?=#             make bench-scale: more flags (`python -m pipeline bench-scale --help`)

PY := $(VENV)/bin/python
FEATURE_FLAGS = $(if $(DATA_DIR),--data-dir '$(DATA_DIR)',--dataset '$(DATASET)') \
	$(if $(TFDS_DIR),--tfds-dir '$(TFDS_DIR)') $(if $(NO_DOWNLOAD),--no-download) $(if $(SPLITS),--splits '$(SPLITS)') \
	--val-fraction $(VAL_FRACTION) --test-fraction $(TEST_FRACTION) --test-from-validation $(TEST_FROM_VALIDATION) \
	--backbone $(BACKBONE) --weights '$(WEIGHTS)' $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) --pooling $(POOLING) \
	--batch-size $(BATCH_SIZE) --dtype $(DTYPE) --seed $(SEED) --shard $(SHARD) --num-shards $(NUM_SHARDS) \
	$(if $(STRICT),--strict) $(if $(MIXED_PRECISION),--mixed-precision) --output-dir '$(FEATURES_DIR)'

HEAD_FLAGS = $(if $(FEATURES),--features '$(FEATURES)') --head $(HEAD) $(if $(C),--C $(C)) --hidden $(HIDDEN) \
	--dropout $(DROPOUT) --epochs $(EPOCHS) --head-batch-size $(HEAD_BATCH_SIZE) --learning-rate $(LEARNING_RATE) \
	--patience $(PATIENCE) $(if $(CLASS_WEIGHT),--class-weight $(CLASS_WEIGHT)) --runs-dir '$(RUNS_DIR)' \
	$(if $(VIEWS),--views $(VIEWS)) $(if $(TRAIN_PER_CLASS),--train-per-class $(TRAIN_PER_CLASS)) \
	$(if $(MEMORY_BUDGET),--memory-budget $(MEMORY_BUDGET))

AUG_FLAGS = --aug-flip $(AUG_FLIP) --aug-rotation $(AUG_ROTATION) --aug-zoom $(AUG_ZOOM) \
	--aug-contrast $(AUG_CONTRAST) --aug-translation $(AUG_TRANSLATION)

FINETUNE_FLAGS = --fine-tune-at '$(FINE_TUNE_AT)' --fine-tune-epochs $(FINE_TUNE_EPOCHS) \
	$(if $(FINE_TUNE_LEARNING_RATE),--fine-tune-learning-rate $(FINE_TUNE_LEARNING_RATE)) \
	--fine-tune-batch-size $(FINE_TUNE_BATCH_SIZE) --fine-tune-patience $(FINE_TUNE_PATIENCE) --optimizer $(OPTIMIZER) \
	--head-epochs $(HEAD_EPOCHS) $(if $(FROM_SCRATCH),--from-scratch)

RUN_FLAGS = $(if $(RUN),--run '$(RUN)')

ENGINE_FLAGS = --engine $(ENGINE) $(if $(WORKERS),--workers $(WORKERS)) \
	$(if $(GPUS_PER_WORKER),--gpus-per-worker $(GPUS_PER_WORKER)) --ray-shard-size $(RAY_SHARD_SIZE)

.PHONY: help features head finetune compare export predict backbones bench bench-features bench-head bench-scale test test-all clean-venv

help: ## list targets and variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "Variables (make TARGET VAR=value):"
	@grep -E '^[A-Z_]+ \?=' $(MAKEFILE_LIST) | sed -E 's/ \?= ?/=/; s/#\s*/\t/' | awk -F'\t' '{printf "  %-32s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

features: $(VENV)/.installed ## stage 1: run the frozen backbone once, cache features to HDF5 in FEATURES_DIR
	$(PY) -m pipeline features $(FEATURE_FLAGS) --aug-views $(AUG_VIEWS) $(AUG_FLAGS) $(ENGINE_FLAGS)

head: features ## stage 2: train HEAD on the cached features; metrics, plots and report in RUNS_DIR
	$(PY) -m pipeline head $(FEATURE_FLAGS) $(HEAD_FLAGS)

# Warm-starting needs the stage-2 head; HEAD_EPOCHS or FROM_SCRATCH train without one.
finetune: $(if $(filter-out 0,$(HEAD_EPOCHS))$(FROM_SCRATCH),$(VENV)/.installed,head) ## stage 3: augmented fine-tuning of the top of the backbone, warm-started from the head
	$(PY) -m pipeline finetune $(FEATURE_FLAGS) $(HEAD_FLAGS) $(RUN_FLAGS) $(AUG_FLAGS) $(FINETUNE_FLAGS)

compare: $(VENV)/.installed ## cached heads vs fine-tuning the top block / everything vs from scratch (+ views, seed workflow): table and plots
	$(PY) -m pipeline compare $(FEATURE_FLAGS) $(HEAD_FLAGS) $(AUG_FLAGS) $(FINETUNE_FLAGS) --rows '$(COMPARE_ROWS)' \
		$(if $(COMPARE_DIR),--out '$(COMPARE_DIR)')

export: head ## one Keras model, raw images in and probabilities out (.keras, SavedModel, TFLITE=1) in RUN/export
	$(PY) -m pipeline export $(FEATURE_FLAGS) $(HEAD_FLAGS) $(RUN_FLAGS) $(if $(TFLITE),--tflite)

predict: $(VENV)/.installed ## top classes per image: make predict IMAGES=<file, folder or glob> [CSV=out.csv]
	$(PY) -m pipeline predict $(FEATURE_FLAGS) $(HEAD_FLAGS) $(RUN_FLAGS) --top $(TOP) $(if $(CSV),--csv '$(CSV)') $(IMAGES)

bench-features: $(VENV)/.installed ## benchmark stage 1 (throughput vs bare forward pass, peak memory) -> bench/features.{json,md}
	$(PY) -m pipeline bench-features --data-dir '$(BENCH_DATA)' --weights '$(BENCH_WEIGHTS)' --backbone '$(BENCH_BACKBONE)' \
		--image-size $(BENCH_IMAGE_SIZE) --batch-size $(BATCH_SIZE)

BENCH_FEATURE_FLAGS = --data-dir '$(BENCH_DATA)' --weights '$(BENCH_WEIGHTS)' --backbone '$(BENCH_BACKBONE)' --image-size $(BENCH_IMAGE_SIZE) \
	--output-dir '$(FEATURES_DIR)'

bench-head: $(VENV)/.installed ## benchmark stage 2: head training seconds on the benchmark's cached features -> bench/head.{json,md}
	$(PY) -m pipeline features $(BENCH_FEATURE_FLAGS)
	$(PY) -m pipeline bench-head $(BENCH_FEATURE_FLAGS)

# Quick mode generates its own data and backbone, so it takes none of the asset variables.
bench: $(VENV)/.installed ## pipeline vs the seed workflow: speed, accuracy, storage, memory -> bench/results.{json,md}
	$(PY) -m pipeline bench $(if $(filter-out 0,$(BENCH_QUICK)),--quick,--data-dir '$(BENCH_DATA)' --weights '$(BENCH_WEIGHTS)' \
		--backbone '$(BENCH_BACKBONE)' --image-size $(BENCH_IMAGE_SIZE) --epochs $(BENCH_EPOCHS)) \
		--batch-size $(BATCH_SIZE) $(if $(BENCH_OUT),--out '$(BENCH_OUT)')

bench-scale: $(VENV)/.installed ## ENGINE=ray vs local, the driver's ceiling, extraction and heads against size -> bench/scale.{json,md}
	$(PY) -m pipeline bench-scale --parts '$(BENCH_SCALE_PARTS)' --data-dir '$(BENCH_DATA)' --weights '$(BENCH_WEIGHTS)' \
		--backbone '$(BENCH_BACKBONE)' --image-size $(BENCH_IMAGE_SIZE) --batch-size $(BATCH_SIZE) $(BENCH_SCALE_FLAGS)

backbones: $(VENV)/.installed ## list the registered backbones
	$(PY) -m pipeline backbones

test: $(VENV)/.installed ## run the test suite (real-asset tests skip when SHARED is absent)
	PIPELINE_SHARED='$(SHARED)' $(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.installed ## the test suite including slow tests
	PIPELINE_SHARED='$(SHARED)' $(PY) -m pytest --runslow $(PYTEST_ARGS)

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
