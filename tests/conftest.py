"""Test set-up: 8 simulated CPU devices (set before jax is imported), one compilation cache per run, the longest files
first, the repo root on sys.path, no network."""
import os
import shutil
import sys
import tempfile

# LLVM optimisation level 0 compiles CPU executables 1.5-3x faster (random initialisers dominate: each compiles
# to a loop) with the same results and about the same run time, since convolutions and matmuls are library
# calls. Tests compile far more than they run.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # timm must never reach for the hub
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds-data-dir')  # a test that forgets data_dir fails fast
# One persistent compilation cache for the run: pytest's workers and every process the tests start inherit this
# variable, and many tests compile the same programs (the quickstart's steps in each workdir they train, eval.py's
# step after train.py's); tests/test_docs.py and tests/test_workdirs.py take 40% less time with it. The process
# that starts the run makes the folder and removes it at the end (pytest_unconfigure), so no run reads another's.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = CACHE = tempfile.mkdtemp(prefix='mixer_jax_tests_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
else:
  CACHE = None  # a worker's, or the user's own
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixer_jax import cli  # noqa: E402  (no JAX inside)

cli.tpu_compiler_environment()  # TPU compiles (tests/test_aot.py) in both pytest workers


def pytest_unconfigure(config):
  if CACHE:
    shutil.rmtree(CACHE, ignore_errors=True)


# The files that take longest, first (measured with --durations=0): pytest-xdist gives each free worker the next file
# in this order (make test: --dist loadfile --no-loadscope-reorder, instead of the default, most tests first, which
# left the files of a few long tests for the end and one worker alone with them).
LONGEST_FIRST = ('test_aot_gpu.py', 'test_docs.py', 'test_aot.py', 'test_randaug_timm.py', 'test_buckets.py',
                 'test_train.py', 'test_models.py', 'test_recipes.py', 'test_multihost.py', 'test_gpu_launchers.py',
                 'test_convert_timm.py', 'test_data_pipeline.py', 'test_workdirs.py', 'test_commands.py',
                 'test_bench.py', 'test_checkpoints.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
