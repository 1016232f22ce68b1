# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the CPU build of torch plus this package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: venv demo test lint data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# independent attack implementation for cross-checks: the `crosscheck` extra of pyproject.toml,
	# installed without its declared dependencies (they would pull an unpinned torchvision and
	# another torch); what it imports at run time is in the dev extra
	$(BIN)/pip install -q --no-deps torchattacks
	touch $(STAMP)

venv: $(STAMP)

data:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "Fashion-MNIST not found under $(FMNIST_DIR); installing dataset-fashion-mnist with apt-get"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	      { echo "could not install dataset-fashion-mnist; pass DATA_DIR=... with the idx .gz files"; exit 1; }; \
	  else echo "Fashion-MNIST not found under $(FMNIST_DIR); install dataset-fashion-mnist or set FMNIST_DIR"; exit 1; fi; \
	fi

demo: venv data
	$(BIN)/ssni demo --data-dir $(FMNIST_DIR) --out demo-output

test: venv data
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output
