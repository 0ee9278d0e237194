# fedctl — every dependency is installed by the project itself into .venv.
#   make install   virtual environment with fedctl, PyTorch (CPU, pinned), MXNet 1.9.1 and test tools
#   make test      install if needed, then the whole test suite
#   make demo      install if needed, then a real local federation on the bundled MNIST sample
#   make bench     install if needed, then the benchmarks (bench/results/: JSON, markdown, PNG)
#   make fuzz      install if needed, add atheris, then fuzz the wire decoder for FUZZ_SECONDS (docs/reliability.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
# numpy 1.23.5: the newest numpy MXNet 1.9.1 runs with (np.bool was removed in 1.24); torch 2.13 accepts it.
NUMPY_PIN := $(shell $(PYTHON) -c 'import sys; print("numpy==1.23.5" if sys.version_info < (3, 12) else "numpy>=1.26")')
STAMP  := $(VENV)/.stamp-install
# MXNet 1.9.1 has no wheels beyond Python 3.11: newer Pythons get a PyTorch-only install.
EXTRAS := $(shell $(PYTHON) -c 'import sys; print("torch,mxnet,dev" if sys.version_info < (3, 12) else "torch,dev")')

.PHONY: install test acceptance test-fast demo bench fuzz lint typecheck clean fashion-mnist

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The exact CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PIP) install --quiet "$(TORCH_PIN)" "$(NUMPY_PIN)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]" "$(NUMPY_PIN)"
	$(VENV)/bin/fedctl --version
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

acceptance: install
	$(PY) -m pytest -q -m slow tests

test-fast: install
	$(PY) -m pytest -q -x -m "not slow" tests/unit

demo: install
	$(VENV)/bin/fedctl demo

bench: install
	$(PY) bench/run.py
	$(VENV)/bin/fedctl bench scale --workers 100 --workers 1000

# Coverage-guided fuzzing of the decoder. atheris is a fuzzing-only dependency, installed here and nowhere else;
# the corpus and any crash-* reproducer go to FUZZ_DIR (under runs/, which git ignores).
FUZZ_SECONDS ?= 300
FUZZ_DIR     ?= runs/fuzz

fuzz: install
	$(PIP) install --quiet --only-binary=atheris atheris
	mkdir -p $(FUZZ_DIR)/corpus
	$(PY) fuzz/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) -timeout=5 -rss_limit_mb=2048 \
		-print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/ $(FUZZ_DIR)/corpus

lint: install
	$(VENV)/bin/ruff check fedctl tests bench

typecheck: install
	$(VENV)/bin/mypy fedctl

# Optional: Fashion-MNIST from Debian (needs root); fedctl finds it in /usr/share/datasets/fashion-mnist.
fashion-mnist:
	apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
