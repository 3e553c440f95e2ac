# Every target sets up .venv from the pinned requirements first, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# 8 simulated CPU devices, so that sharding is exercised without accelerators (see tests/conftest.py).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu

.PHONY: test venv

venv: $(VENV)/.installed

# Re-installs whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m pytest -q tests
