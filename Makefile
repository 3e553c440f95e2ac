# Every target sets up what it needs first (.venv from the pinned requirements, the Debian Fashion-MNIST
# package), so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# 8 simulated CPU devices, so that sharding is exercised without accelerators (see tests/conftest.py).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu

.PHONY: bench quickstart test venv fashion-mnist

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

# Step speed of every family's flagship variants on this machine's devices (BENCHMARKS.md): tables on stdout,
# JSON lines in bench.jsonl. Sized for a CPU, where full-size ConvMixers use the grouped depthwise convolution
# (the shift-and-add form needs too much memory at 224) and run inference only (XLA:CPU turns the grouped
# convolution's gradient into a dense one: 92 s per convmixer_768_32 step at batch 2). On an accelerator, e.g.:
#   make bench BENCH="--mode train,infer --batch 256 --dtype bfloat16" CONVMIXER_BENCH="--mode train,infer --batch 128 --dtype bfloat16"
BENCH ?= --mode train,infer --batch 4 --steps 2 --repeats 3 --warmup 1 --baseline
CONVMIXER_BENCH ?= --model_options depthwise=conv --mode infer --batch 4 --steps 2 --repeats 3 --warmup 1
bench: $(VENV)/.runtime
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mixer_jax.bench model --model mixer_b16,mixer_l16,davit_tiny,davit_base \
	  $(BENCH) --jsonl bench.jsonl
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mixer_jax.bench model --model convmixer_768_32,convmixer_1536_20 \
	  $(CONVMIXER_BENCH) --jsonl bench.jsonl
