# fedctl — every dependency is installed by the project itself into .venv.
#   make install   virtual environment with fedctl, PyTorch 2.13.0, MXNet 1.9.1 (Python <= 3.11) and test tools
#   make test      install if needed (and Chromium for the browser test), then the test suite without the long runs
#                  (`slow`: make acceptance)
#   make demo      install if needed, then a real local federation on the bundled MNIST sample
#   make bench     install if needed, then the benchmarks (bench/results/: JSON, markdown, PNG)
#   make fuzz      install if needed, add atheris, then fuzz the wire decoder for FUZZ_SECONDS (docs/reliability.md)
#
# Which builds `make install` gets (docs/install.md). The version is pinned; the build is chosen by the index:
#   TORCH_INDEX=        (default) what pip's configured index has for torch==2.13.0. From plain PyPI on Linux x86_64
#                       that is the CUDA build: the torch wheel plus nvidia-* CUDA libraries, several GB (it runs on
#                       CPU-only machines too). On this development machine a local CPU wheel in pip's find-links
#                       (/opt/wheels) satisfies the pin first, so here it is 2.13.0+cpu.
#   TORCH_INDEX=cpu     PyTorch's CPU-only index, https://download.pytorch.org/whl/cpu: no CUDA libraries.
#   TORCH_INDEX=cu128   that CUDA build (any tag PyTorch publishes for this release), or TORCH_INDEX=URL: any index.
#   MXNET=mxnet-cu112   MXNet 1.9.1 built for CUDA 11.2 (or mxnet-cu110, ...) instead of the CPU wheel `mxnet`.
# Changing either on an existing .venv does nothing (it is up to date): `make clean install TORCH_INDEX=cpu`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN   := torch==2.13.0
TORCH_INDEX ?=
MXNET       ?= mxnet
TORCH_FROM  := $(if $(strip $(TORCH_INDEX)),--index-url $(if $(findstring ://,$(TORCH_INDEX)),$(TORCH_INDEX),https://download.pytorch.org/whl/$(strip $(TORCH_INDEX))))
# MXNet 1.9.1 needs numpy < 1.24 (it uses np.bool), whose newest, 1.23.5, has no wheels beyond Python 3.11: newer
# Pythons get a PyTorch-only install. torch 2.13 accepts numpy 1.23.5.
MXNET_OK  := $(shell $(PYTHON) -c 'import sys; print("yes" if sys.version_info < (3, 12) else "")')
NUMPY_PIN := $(if $(MXNET_OK),numpy==1.23.5,numpy>=1.26)
# The `mxnet` extra names the CPU wheel; another MXNet package is installed beside a torch-only extra instead.
EXTRAS_ALL   := torch,mxnet,data,dp,ray,dev
EXTRAS_TORCH := torch,data,dp,ray,dev
EXTRAS    := $(if $(and $(MXNET_OK),$(filter mxnet,$(MXNET))),$(EXTRAS_ALL),$(EXTRAS_TORCH))
MXNET_REQ := $(if $(and $(MXNET_OK),$(filter-out mxnet,$(MXNET))),"$(MXNET)==1.9.1")
STAMP  := $(VENV)/.stamp-install

.PHONY: install test acceptance test-fast demo bench fuzz lint typecheck clean fashion-mnist browser

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedctl needs Python >= 3.11 (asyncio.TaskGroup, asyncio.timeout): make PYTHON=python3.11 install")'
	$(PYTHON) -m venv $(VENV)
	# torch alone first, so that TORCH_INDEX chooses its build and nothing else; the extras then find it installed.
	$(PIP) install --quiet $(TORCH_FROM) "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]" $(MXNET_REQ) "$(NUMPY_PIN)"
	$(VENV)/bin/fedctl --version
	touch $(STAMP)

test: install browser
	$(PY) -m pytest -q -m "not slow" tests

# The dashboard's browser test (tests/e2e/test_dashboard.py) drives headless Chromium: Debian's chromium and
# chromium-driver, installed here when missing. Without root or apt-get they are not, and that test is skipped,
# saying why; nothing else needs them.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  apt-get install -y chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update >/dev/null 2>&1 && apt-get install -y chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "note: chromium and chromium-driver could not be installed (root and apt-get needed): the browser test will be skipped"

acceptance: install
	$(PY) -m pytest -q -m slow tests

test-fast: install
	$(PY) -m pytest -q -x -m "not slow" tests/unit

demo: install
	$(VENV)/bin/fedctl demo

bench: install
	$(PY) bench/run.py
	$(PY) bench/threads.py
	$(PY) bench/task_overhead.py
	$(VENV)/bin/fedctl bench scale --workers 100 --workers 1000
	$(VENV)/bin/fedctl bench scale --workers 1000 --workers 10000 --edges 0 --edges 10 --sampled 100 --rounds 10
	$(VENV)/bin/fedctl bench privacy --part secagg
	$(VENV)/bin/fedctl bench round
	$(VENV)/bin/fedctl bench metrics
	$(VENV)/bin/fedctl bench heartbeat --metrics

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
