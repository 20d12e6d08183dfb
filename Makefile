# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
KERNEL := saelib

.PHONY: setup browser-deps demo test lab bench bench-peers lint clean-venv

# sparsify's and dictionary_learning's wheels (the format round-trip tests and the peers
# benchmark use them) without their dependency trees (datasets, wandb, umap; dictionary-learning
# also pins nnsight<0.4, which saelib's nnsight 0.8 excludes): only what their SAE code imports.
# SAELens comes with its dependencies, from the dev extra.
PEERS := eai-sparsify==1.3.3 dictionary-learning==0.1.0 einops==0.8.2 natsort==8.4.0 \
	simple-parsing==0.1.9 docstring-parser==0.18.0 schedulefree==1.4.1

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: with it in place, the project's "torch>=2.4" installs nothing more.
	$(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps $(PEERS)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (saelib)"
	touch $(STAMP)

demo: setup
	$(PY) -m saelib fetch
	$(PY) -m saelib run all
	$(PY) -m saelib report

# Headless Chromium for tests/browser (Debian's package; never a downloaded browser build).
# Installed only when missing and we are root; if apt is unavailable the browser tests skip.
CHROMIUM ?= /usr/bin/chromium

browser-deps:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
			|| echo "browser-deps: could not install chromium; browser tests will skip"; \
	else \
		echo "browser-deps: $(CHROMIUM) missing and not root with apt; browser tests will skip"; \
	fi

test: setup browser-deps
	$(PY) -m saelib fetch
	$(PY) -m ruff check saelib tests benchmarks
	$(PY) -m pytest

lab: setup
	SAELIB_OUTPUTS=$(CURDIR)/outputs $(PY) -m saelib lab --notebook-dir=notebooks

bench: setup
	$(PY) benchmarks/topk_step.py

bench-peers: setup
	$(PY) benchmarks/peers.py

lint: setup
	$(PY) -m ruff check saelib tests benchmarks
	$(PY) -m ruff format --check saelib tests benchmarks

clean-venv:
	rm -rf $(VENV)
