"""Reading and writing checkpoint files, never executing code from them, with one-line errors naming the file.

Checkpoints come from the internet, so a malicious one must not run code: `.npz` files load with
`allow_pickle=False`, PyTorch files with `torch.load(weights_only=True)` (tensors and plain containers only),
`.safetensors` hold no code by design. A file that needs pickled objects is refused with a message saying so.
PyTorch is needed only for `.pth`-style files (it is a test requirement, not a runtime one).

Formats: '.npz' (Google's Mixer files), '.safetensors', '.pth' / '.pth.tar' / '.pt' / '.bin' / '.ckpt'
(PyTorch), and directories holding an orbax checkpoint (a training workdir, its `checkpoints/` folder, one step,
or a converted variables checkpoint).
"""
import os
import pickle
import zipfile

import numpy as np

TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.ckpt')
STATE_DICT_KEYS = ('state_dict', 'model')  # where training scripts nest the weights


def checkpoint_format(path: str) -> str:
  """'npz', 'safetensors', 'torch' or 'orbax' (a directory); anything else is an error."""
  if os.path.isdir(path):
    return 'orbax'
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file or directory')
  name = path.lower()
  if name.endswith('.npz'):
    return 'npz'
  if name.endswith('.safetensors'):
    return 'safetensors'
  if name.endswith(TORCH_SUFFIXES):
    return 'torch'
  raise ValueError(f'{path}: unknown checkpoint format; expected .npz, .safetensors, '
                   f'{"/".join(TORCH_SUFFIXES)} or an orbax checkpoint directory')


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except ValueError as error:
    if 'allow_pickle' in str(error):
      raise ValueError(f'refusing {path}: it holds pickled Python objects, which could run code when loaded; '
                       'save plain arrays instead') from None
    raise ValueError(f'{path} is not a readable .npz file ({error})') from None
  except (zipfile.BadZipFile, EOFError, OSError) as error:
    raise ValueError(f'{path} is not a readable .npz file (truncated or corrupt?): {error}') from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(path, framework='numpy') as f:  # numpy framework: bfloat16 arrives as ml_dtypes.bfloat16
      return {key: f.get_tensor(key) for key in f.keys()}
  except (SafetensorError, OSError) as error:
    raise ValueError(f'{path} is not a readable .safetensors file (truncated or corrupt?): {error}') from None


def read_torch(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ValueError(f'reading {path} needs PyTorch (pip install torch==2.13.0+cpu), or convert it to '
                     '.safetensors elsewhere') from None
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    reason = str(error).splitlines()[0]
    raise ValueError(f'refusing {path}: it needs pickled Python objects beyond tensors, which could run code '
                     f'when loaded ({reason})') from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
    raise ValueError(f'{path} is not a readable PyTorch file (truncated or corrupt?): '
                     f'{str(error).splitlines()[0]}') from None


def unwrap_state_dict(checkpoint: dict) -> dict:
  """The weights of a training checkpoint: under 'state_dict' or 'model' if nested, 'module.' (DDP) stripped."""
  for key in STATE_DICT_KEYS:
    if isinstance(checkpoint.get(key), dict):
      checkpoint = checkpoint[key]
      break
  if checkpoint and all(k.startswith('module.') for k in checkpoint):
    checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
  return checkpoint


def read_state_dict(path: str) -> dict:
  """A PyTorch-style state dict from a .safetensors or PyTorch file."""
  fmt = checkpoint_format(path)
  if fmt == 'safetensors':
    return read_safetensors(path)
  if fmt == 'torch':
    return unwrap_state_dict(read_torch(path))
  raise ValueError(f'{path} is a {fmt} checkpoint, not a PyTorch state dict')


def _orbax_item(path: str) -> str:
  """The orbax item directory inside a workdir / checkpoints folder / step directory."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  steps = [d for d in os.listdir(path) if d.isdigit()]
  if steps:
    path = os.path.join(path, max(steps, key=int))
  if os.path.isdir(os.path.join(path, 'default')):
    path = os.path.join(path, 'default')
  if not os.path.exists(os.path.join(path, '_METADATA')):
    raise ValueError(f'{path} holds no complete orbax checkpoint')
  return path


def read_orbax(path: str) -> dict:
  """{'params': ..., ['batch_stats': ...]} of an orbax checkpoint as numpy arrays (optimizer state and the rest of
  a training state are not read)."""
  import jax
  import orbax.checkpoint as ocp
  item = _orbax_item(path)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item).item_metadata.tree
  if 'params' not in tree:
    raise ValueError(f'{path}: the orbax checkpoint has no params (keys: {", ".join(tree)})')
  target = {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k]) for k in ('params', 'batch_stats')
            if tree.get(k)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  return checkpointer.restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                 partial_restore=True))


def write_orbax(variables: dict, path: str) -> None:
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), variables)
  checkpointer.wait_until_finished()
