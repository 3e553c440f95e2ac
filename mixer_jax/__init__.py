"""mixer_jax: MLP-Mixer, ConvMixer and DaViT in JAX/Flax, with Google's TPU training setup.

Importing the package keeps the start-up notices of the libraries under it out of the user's output, unless the
environment already says otherwise: TensorFlow's C++ INFO and WARNING lines (`TF_CPP_MIN_LOG_LEVEL=2`; tf.data is
only the input pipeline here), and, where libtpu is installed on a machine without a TPU (the test requirements
install it, to compile for TPUs), the page of warnings it prints while probing for a TPU before JAX falls back to
the CPU (`cli.quiet_libtpu_probe`).

It also bounds the retries of TensorFlow's GCS file system (TensorBoard events and datasets in a bucket) as the other
storage clients' are (`paths.tensorflow_settings`), which TensorFlow reads only when it is imported, after this.
"""
import os as _os

_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from mixer_jax import cli as _cli  # noqa: E402
from mixer_jax import paths as _paths  # noqa: E402

_cli.quiet_libtpu_probe()
_os.environ.update(_paths.tensorflow_settings())
