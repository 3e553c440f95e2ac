# Every target sets up what it needs first (.venv from the pinned requirements, the Debian packages below), so a
# fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# 8 simulated CPU devices, so that sharding is exercised without accelerators (see tests/conftest.py).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
	TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu
# Whole files per worker, the longest first (the order is tests/conftest.py's, not xdist's most-tests-first).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: bench gpu-compiler quickstart test test-fast venv debian-packages

venv: $(VENV)/.runtime

# Re-install whenever a requirements file changes. The runtime set is enough to train; tests add torch/timm. The
# project itself is installed editable (pyproject.toml: no copy, its dependencies are the pins above), so its
# commands and `import mixer_jax` work from any directory.
$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# XLA:GPU's compiler (bench compile --topology=h100:8, the GPU compile tests), in a folder of its own that only
# mixer_jax/gpus.py puts on the path: with JAX's CUDA plugin in the environment, every CPU run would probe for a GPU.
GPU_COMPILER := $(VENV)/gpu-compiler
gpu-compiler: $(GPU_COMPILER)/.installed
$(GPU_COMPILER)/.installed: requirements-gpu-compile.txt $(VENV)/.runtime
	rm -rf $(GPU_COMPILER)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(GPU_COMPILER) \
	  -r requirements-gpu-compile.txt
	touch $@

# Debian packages: the real Fashion-MNIST (the offline default dataset) and tcmalloc, which train.py, eval.py and
# the benchmark preload (mixer_jax/cli.py: under glibc's malloc every XLA:CPU step page-faults its temporaries).
DEBIAN_PACKAGES := dataset-fashion-mnist libtcmalloc-minimal4
debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; }; \
	else \
	  echo "not installed: run 'sudo apt-get install" $$missing"' (continuing without them)"; \
	fi

test: $(VENV)/.installed $(GPU_COMPILER)/.installed debian-packages
	$(TEST_ENV) $(PYTEST) tests

# The suite without the tests marked slow (pytest.ini): for the edit-test loop; `make test` stays the CI command.
test-fast: $(VENV)/.installed $(GPU_COMPILER)/.installed debian-packages
	$(TEST_ENV) $(PYTEST) -m 'not slow' tests

# The offline default: a small MLP-Mixer on Fashion-MNIST on the CPU; prints the test accuracy. ARGS go to train.py,
# e.g. make quickstart ARGS=--config.total_steps=300 (a short run; tests/test_docs.py runs it so).
quickstart: $(VENV)/.runtime debian-packages
	$(PY) train.py --config=configs/quickstart.py --workdir=workdirs/quickstart $(ARGS)

# Step speed of every family's flagship variants on this machine's devices (BENCHMARKS.md): tables on stdout,
# JSON lines in bench.jsonl. Sized for a CPU, where full-size ConvMixers use the grouped depthwise convolution
# (the shift-and-add form needs too much memory at 224) and run inference only (XLA:CPU turns the grouped
# convolution's gradient into a dense one: 92 s per convmixer_768_32 step at batch 2). On an accelerator, e.g.:
#   make bench BENCH="--mode train,infer --batch 256 --dtype bfloat16" CONVMIXER_BENCH="--mode train,infer --batch 128 --dtype bfloat16"
BENCH ?= --mode train,infer --batch 4 --steps 2 --repeats 3 --warmup 1 --baseline
CONVMIXER_BENCH ?= --model_options depthwise=conv --mode infer --batch 4 --steps 2 --repeats 3 --warmup 1
bench: $(VENV)/.runtime debian-packages
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mixer_jax.bench model --model mixer_b16,mixer_l16,davit_tiny,davit_base \
	  $(BENCH) --jsonl bench.jsonl
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mixer_jax.bench model --model convmixer_768_32,convmixer_1536_20 \
	  $(CONVMIXER_BENCH) --jsonl bench.jsonl
