# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
# HF_HUB_OFFLINE: everything the demo and tests use ships in pip packages; never wait on a hub.
export HF_HUB_OFFLINE := 1
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench reproduce clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/decaf run

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_tsvd.py
	$(BIN)/python benchmarks/bench_aggregation.py
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_merge.py
# benchmarks/bench_vs_flower.py needs Flower: pip install -e ".[bench]" first (about 20 minutes).

# The reproduction study (docs/reproduction.md): 417 runs, about 11 core-hours (6 h on 2 cores); it resumes where it
# stopped (finished runs are read back, interrupted ones resume from their checkpoints).
REPRO_WORKERS ?= 2
reproduce: $(BIN)/.installed
	$(BIN)/python reproduce/study.py --workers $(REPRO_WORKERS)
	$(BIN)/python reproduce/synthetic.py
	$(BIN)/python reproduce/report.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
