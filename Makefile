# Every target sets up what it needs first (.venv from the pinned requirements, the Debian Fashion-MNIST
# package), so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# 8 simulated CPU devices, so that sharding is exercised without accelerators (see tests/conftest.py).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu

.PHONY: quickstart test venv fashion-mnist

venv: $(VENV)/.runtime

# Re-install whenever a requirements file changes. The runtime set is enough to train; tests add torch/timm.
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
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
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile tests

# The offline default: a small MLP-Mixer on Fashion-MNIST on the CPU; prints the test accuracy.
quickstart: $(VENV)/.runtime fashion-mnist
	$(PY) train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
