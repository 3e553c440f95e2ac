"""Test set-up: 8 simulated CPU devices (set before jax is imported), the repo root on sys.path, no network."""
import os
import sys

# LLVM optimisation level 0 compiles CPU executables 1.5-3x faster (random initialisers dominate: each compiles
# to a loop) with the same results and about the same run time, since convolutions and matmuls are library
# calls. Tests compile far more than they run.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # timm must never reach for the hub
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds-data-dir')  # a test that forgets data_dir fails fast
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixer_jax import cli  # noqa: E402  (no JAX inside)

cli.tpu_compiler_environment()  # TPU compiles (tests/test_aot.py) in both pytest workers
