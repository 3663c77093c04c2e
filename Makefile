# reelfarm: `make demo` renders the embedded demo; `make test` runs the whole suite.
# Both set themselves up first: a .venv with reelfarm installed, CPU torch included.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Where torch comes from. pip's default index gives Linux the multi-gigabyte CUDA build, so the
# default is PyTorch's own CPU wheel index, unless pip is configured with an index or find-links
# of its own (a mirror, trusted to serve the build wanted), which is then left to choose.
# Override: TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA build), TORCH_INDEX= (pip's).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_HAS_INDEX = $(shell [ -n "$$PIP_INDEX_URL$$PIP_EXTRA_INDEX_URL$$PIP_FIND_LINKS" ] \
    || $(PYTHON) -m pip config list 2>/dev/null | grep -qE '(index-url|find-links)=' && echo yes)
TORCH_INDEX ?= $(if $(PIP_HAS_INDEX),,$(TORCH_CPU_INDEX))
TORCH_FROM = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: setup demo test bench bench-smoke clean

setup: $(STAMP)

# torch is installed first and pinned (constraints.txt), from TORCH_INDEX: the build installed
# satisfies every later requirement, so nothing pulls another one.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(TORCH_FROM)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/reelfarm render configs/demo.yaml
	@echo "next: open out/demo/report.html in a browser (summary, gallery; the videos play there);"
	@echo "      $(BIN)/reelfarm status out/demo     counts, errors and the run's figures"
	@echo "      $(BIN)/reelfarm verify out/demo     every video checked against the manifest"

# The suite runs on TEST_WORKERS processes at once (pytest-xdist; 0 runs it in this one), a whole
# test file per worker: each worker is a session of its own, with its own local Ray cluster, and a
# file's module fixtures (a rendered output, a Ray head, a browser) are made once. (Three
# processes on two cores were no faster than two: 14:01 against 14:48 of tests, with more
# timing-bound tests at risk.)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10
# The layering first (pyproject.toml's import-linter contracts): seconds, and a broken one says where.
# Then reelfarm's own tests; the benchmarks' smoke runs are `make bench-smoke`.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(PYTEST) --ignore=tests/test_bench $(PYTEST_ARGS)

# Every benchmark's --quick mode, end to end (what `python -m bench.run --quick` runs), checked to
# run and save its results (minutes: whole jobs on Ray; CI runs it after `make test`).
bench-smoke: $(STAMP)
	$(PYTEST) tests/test_bench $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf out .pytest_cache
