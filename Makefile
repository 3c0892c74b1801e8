# olavlm — two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,deepspeed,peft
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo demo-quick bench bench-quick bench-stability bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/olavlm demo --output-dir runs/demo

demo-quick: setup
	$(VENV)/bin/olavlm demo --quick --output-dir runs/demo-quick

bench: setup
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick

# make bench twice: as the machine is, then beside a one-core busy process; the table checks they agree
bench-stability: setup
	$(PY) -m benchmarks.run --stability

# real-size comparisons on one GPU (<= 8 min); no setup step: GPU machines bring their own environment
bench-gpu:
	PYTHONPATH=src $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
