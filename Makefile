# reelfarm: `make demo` renders the embedded demo; `make test` runs the whole suite.
# Both set themselves up first: a .venv with reelfarm installed, CPU torch included.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is installed first and pinned (constraints.txt): the CPU build of 2.13.0 satisfies every
# later requirement, so nothing pulls the multi-gigabyte CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/reelfarm render configs/demo.yaml
	@echo "next: open out/demo/report.html in a browser (summary, gallery; the videos play there);"
	@echo "      $(BIN)/reelfarm status out/demo     counts, errors and the run's figures"
	@echo "      $(BIN)/reelfarm verify out/demo     every video checked against the manifest"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf out .pytest_cache
