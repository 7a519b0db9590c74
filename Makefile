# `make demo` and `make test` work on a fresh machine: they create .venv on first use.
# torch==2.13.0 is installed first, alone: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -q

# The generic fuzzer over every subcommand's inputs (tests/faults/fuzz_cli.py); `make test`
# runs a 180-case slice of it.
FUZZ_CASES ?= 2000
FUZZ_SEED ?= 0

.PHONY: setup demo test fuzz docs lint bench bench-memory bench-compare bench-cold bench-search bench-data-aware bench-zipit bench-scale bench-vision clean mergekit-venv fusionbench-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# mergekit 0.1.5 in a venv of its own, for the drop-in comparison tests (tests/test_mergekit_compat.py).
MK_VENV ?= .venv-mergekit
$(MK_VENV)/.installed-stamp:
	test -x $(MK_VENV)/bin/python || $(PYTHON) -m venv $(MK_VENV)
	$(MK_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(MK_VENV)/bin/pip install -q --disable-pip-version-check mergekit==0.1.5
	touch $@

mergekit-venv: $(MK_VENV)/.installed-stamp

# FusionBench 0.2.33 in a venv of its own, for the parity tests of the newer methods
# (tests/test_fusionbench_compat.py).
FB_VENV ?= .venv-fusionbench
$(FB_VENV)/.installed-stamp:
	test -x $(FB_VENV)/bin/python || $(PYTHON) -m venv $(FB_VENV)
	$(FB_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(FB_VENV)/bin/pip install -q --disable-pip-version-check fusion-bench==0.2.33
	touch $@

fusionbench-venv: $(FB_VENV)/.installed-stamp

demo: $(STAMP)
	$(PY) -m merganser.demo demo_out --seed 0

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

fuzz: $(STAMP)
	cd tests/faults && ../../$(PY) fuzz_cli.py $(FUZZ_CASES) $(FUZZ_SEED)

# The generated parts of docs/ (the method table), from the registry.
docs: $(STAMP)
	$(PY) scripts/regen_docs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench-memory: $(STAMP)
	$(PY) bench/peak_rss.py

# merganser vs mergekit 0.1.5 vs the I/O floor (~125M and ~1B parameter checkpoints).
bench-compare: $(STAMP) mergekit-venv
	$(PY) bench/compare.py

# Cold page cache: the inputs are evicted (posix_fadvise) before every run and floor read.
bench-cold: $(STAMP)
	$(PY) bench/compare.py --cold --no-mergekit --sizes 1b --methods linear,task_arithmetic,slerp,ties,dare_ties --repeats 4

# Evolver, CMA-ES, greedy soup and kinship-guided greedy merging vs the best fixed merge, on the zoo.
bench-search: $(STAMP)
	$(PY) bench/search.py

# RegMean and Fisher merging (with `merganser calibrate`) vs averaging, on the zoo.
bench-data-aware: $(STAMP)
	$(PY) bench/data_aware.py

# ZipIt!, partial zipping and Git Re-Basin on experts from zoos of two different seeds.
bench-zipit: $(STAMP)
	$(PY) bench/zipit.py

# FusionBench's eight-task table on the vision zoo (a tiny ViT, built and cached on first use).
bench-vision: $(STAMP)
	$(PY) bench/vision.py

# Base + {2, 3, 5, 8} experts at 1B shape: CPU s per GB, wall and peak RSS; mergekit at 8.
bench-scale: $(STAMP) mergekit-venv
	$(PY) bench/scale.py --mergekit

bench: bench-memory bench-compare bench-cold bench-search bench-data-aware bench-zipit bench-scale bench-vision

clean:
	rm -rf demo_out bench_out .pytest_cache
