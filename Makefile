# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup train sweep test bench lint clean

$(PY):
	# --system-site-packages: a torch the user already has (a CUDA build, say) is seen and kept.
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) pyproject.toml
	# Install the CPU build of torch only where no torch is importable at all.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The default Hydra experiment (configs/): a character-level GPT on 2 CPU pipeline stages, a few minutes.
# Outputs (logs, checkpoint, result.json) under outputs/gpt/<date_time>/. TRAIN_ARGS adds Hydra overrides.
TRAIN_ARGS ?=
train: $(STAMP)
	$(PY) -m lightning_pipe.train $(TRAIN_ARGS)

# One short run per number of micro-batches; summary.{csv,md,png} under multirun/sweep_microbatches/<date_time>/.
sweep: $(STAMP)
	$(PY) -m lightning_pipe.train experiment=sweep_microbatches $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/schedule_efficiency.py
	$(PY) benchmarks/simulator_speed.py
	$(PY) benchmarks/weight_split.py

lint: $(STAMP)
	$(PY) -m ruff check lightning_pipe tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
