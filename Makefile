# Targets document themselves: `make help`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install run compile test test-containers image lint lint-deploy train bench-ps bench-kernel bench-recipe bench-pipeline bench-specialize bench-probe bench-noise bench-cpu bench-reference bench-throughput bench-claim bench-predictor-data bench-stream bench-gpu clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/ofa: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/ofa ## create .venv and install the project with its test tools

test: install ## run the test suite but the container tests; installs Debian's dataset + Prometheus if it can
	bash scripts/system_deps.sh
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not containers"

image: install ## build the CPU image here with buildah (Debian base by mmdebstrap, offline wheelhouse); root + apt
	bash scripts/build_image.sh $(BIN)/python

test-containers: image ## what CI runs: the whole suite, its end-to-end smoke run with every stage in the image
	bash scripts/system_deps.sh
	OMP_NUM_THREADS=2 OFA_E2E_RUNNER=container $(BIN)/python -m pytest -q

lint: install ## ruff over the code
	$(BIN)/ruff check onceforall components pipelines tests bench

lint-deploy: install ## hadolint the images, build and validate every kustomize overlay (offline)
	bash scripts/lint_deploy.sh $(BIN)

run: install ## the main job: the whole pipeline on Fashion-MNIST (quick), models + report in runs/published
	bash scripts/system_deps.sh
	$(BIN)/ofa run --schedule quick --out runs/published

compile: install ## compile both pipelines to pipelines/onceforall{,-specialize}.yaml (commit them; CI checks they are fresh)
	$(BIN)/ofa compile --out pipelines/onceforall.yaml
	$(BIN)/ofa compile --specialize --out pipelines/onceforall-specialize.yaml

train: install ## train a supernet alone on Fashion-MNIST (quick schedule), no specialization
	$(BIN)/ofa train --space fashion-mnist --schedule quick --data fashion-mnist --out runs/quick

bench-ps: install ## benchmark: progressive shrinking vs no PS, standard schedule (~2 h on 2 cores: the supernet in ~1 h, then the baseline)
	$(BIN)/python bench/progressive_shrinking.py

bench-kernel: install ## benchmark: what the kernel phase costs the max subnet, one change at a time (~15 min; after bench-ps)
	$(BIN)/python bench/kernel_phase.py

bench-recipe: install ## benchmark: the shrinking recipe's ablation at equal wall time, test read once for the winner (hours; resumable)
	$(BIN)/python bench/recipe.py

bench-pipeline: install ## benchmark: local kfp run vs the same stages called in one process (quick)
	$(BIN)/python bench/pipeline.py

# the scratch runs are the baseline issue #21's bars read: 3 seeds (mean, sd, a paired test each);
# the fine-tunes and distilled scratch runs are one seed each (2 more seeds of them: ~3.5 h on 2 cores)
bench-claim: install ## benchmark: OFA subnets vs the same architectures from scratch and a per-target NAS, cost of N targets against both (resumable; after bench-ps, bench-specialize, bench-pipeline)
	$(BIN)/python bench/claim.py --seeds 0 --nas-seeds 0
	$(BIN)/python bench/claim.py --seeds 1 2 --kinds scratch

bench-predictor-data: install ## benchmark: predictor-data collection on streamed ImageNet-layout JPEGs at 224 px (DATA=imagefolder:PATH)
	$(BIN)/python bench/predictor_data_speed.py $(if $(DATA),--data $(DATA),--make-jpegs 5000) --out docs/results/predictor_data_speed.json

bench-stream: install ## benchmark: a streamed ImageFolder epoch at 224 px vs the in-memory path at 28 px, data path only (images/s; quiet machine)
	$(BIN)/python bench/stream_speed.py

bench-gpu: install ## benchmark: the CUDA path on one GPU: training, step images/s, predictor data and export (a lent GPU machine, ~5 min)
	$(BIN)/python bench/gpu_check.py --out docs/results/gpu_check.json

bench-specialize: install ## benchmark: predictor, latency tables, search, export for the example targets
	$(BIN)/python bench/specialize.py

bench-probe: install ## benchmark: does the host probe see what slows a model? (~2 min)
	$(BIN)/python bench/host_probe.py

bench-noise: install ## benchmark: how far noise in the measured accuracies caps the predictor's tau (after bench-specialize)
	$(BIN)/python bench/predictor_noise.py

bench-cpu: install ## benchmark: training-step speed by memory format, threads, torch.compile
	$(BIN)/python bench/cpu_speed.py

REF_VENV := bench/_ref/venv
# The reference `ofa` package in its own venv (it needs torchvision; torch 2.14.1 runs it unchanged).
$(REF_VENV)/.installed:
	test -x $(REF_VENV)/bin/python || $(PY) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ofa==0.1.0.post202307202001 \
		numpy scipy pyyaml safetensors tqdm
	@touch $@

bench-reference: $(REF_VENV)/.installed ## search speed vs the reference `ofa` package (its own venv: torch 2.14.1)
	$(REF_VENV)/bin/python bench/reference_search.py

bench-throughput: install $(REF_VENV)/.installed ## training/extraction/BN-recalibration speed vs the reference, side by side (~6 min)
	$(BIN)/python bench/training_speed.py

clean: ## remove the venv and run outputs
	rm -rf $(VENV) runs *.egg-info
