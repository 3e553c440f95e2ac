# Every target sets up what it needs first (.venv from the pinned requirements, the Debian Fashion-MNIST
# package), so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# 8 simulated CPU devices, so that sharding is exercised without accelerators (see tests/conftest.py).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu

.PHONY: test venv fashion-mnist

venv: $(VENV)/.installed

# Re-installs whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The real Fashion-MNIST (the offline default dataset) from Debian's dataset-fashion-mnist package.
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist' (continuing without it)"; \
	fi

test: $(VENV)/.installed fashion-mnist
	$(TEST_ENV) $(PY) -m pytest -q tests
