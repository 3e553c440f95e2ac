"""Reading and writing checkpoint files, never executing code from them, with one-line errors naming the file.

Checkpoints come from the internet, so a malicious one must not run code: `.npz` files load with
`allow_pickle=False`, PyTorch files with `torch.load(weights_only=True)` (tensors and plain containers only),
`.safetensors` hold no code by design. A file that needs pickled objects is refused with a message saying so.
PyTorch is needed only for `.pth`-style files (it is a test requirement, not a runtime one).

Files are checked directly, never by the wording of a library's error: `checkpoint_format` compares a file's
first bytes (zip, .npy and pickle magic, safetensors' 8-byte header length and `{`) with its suffix and says what
the file is instead (empty, text, an HTML page, a Git LFS pointer, a single .npy array, another format); before
any array is read, each .npz member's .npy header (shape x itemsize) and a .safetensors header's byte ranges are
checked against the bytes the file holds, so a corrupt header can neither ask for terabytes nor crash a reader.

Formats: '.npz' (Google's Mixer files), '.safetensors', '.pth' / '.pth.tar' / '.pt' / '.bin' / '.ckpt'
(PyTorch), and directories holding an orbax checkpoint (a training workdir, its `checkpoints/` folder, one step,
or a converted variables checkpoint).
"""
import json
import math
import os
import pickle
import zipfile
import zlib

import numpy as np

from mixer_jax import paths
from mixer_jax.convert import pretrained

TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.ckpt')
STATE_DICT_KEYS = ('state_dict', 'model')  # where training scripts nest the weights
_NPY_MAGIC = b'\x93NUMPY'
_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # a first member's header; an empty archive's end record
# What a file is (`_sniff`), as the end of "<path> ...".
_LOOKS = {
    'empty': 'is empty',
    'text': 'is a text file',
    'html': 'is an HTML page',
    'lfs': 'is a Git LFS pointer',
    'npy': 'is a single .npy array',
    'npz': 'is an .npz archive',
    'torch': 'is a PyTorch file',
    'pickle': 'is a Python pickle (a legacy PyTorch file?)',
    'safetensors': 'is a .safetensors file',
    'zip': 'is a zip archive of neither .npy arrays nor PyTorch tensors',
    'broken zip': 'is truncated or corrupt (its zip directory cannot be read)',
    'binary': 'is in no format this reader knows',
}
_EXPECTED = {'npz': 'an .npz archive', 'safetensors': 'a .safetensors file', 'torch': 'a PyTorch file'}
_ACCEPTED = {'npz': ('npz',), 'safetensors': ('safetensors',), 'torch': ('torch', 'pickle')}
_RENAME = {'npz': '.npz', 'torch': '.pth', 'pickle': '.pth', 'safetensors': '.safetensors'}
_FIX = {'npy': 'save the arrays with numpy.savez', 'lfs': 'run `git lfs pull` in the repository it comes from',
        'html': 'download the file itself, not the web page that links to it'}


def _suffix_format(path: str) -> str | None:
  name = path.lower()
  if name.endswith('.npz'):
    return 'npz'
  if name.endswith('.safetensors'):
    return 'safetensors'
  return 'torch' if name.endswith(TORCH_SUFFIXES) else None


def is_remote(path: str) -> bool:
  """Whether `path` names a checkpoint elsewhere (a URL, hf-hub: or a pretrained table name), from its spelling."""
  return path in pretrained.CHECKPOINTS or path.startswith(paths.HUB) or paths.is_url(path)


def local(path: str) -> str:
  """Where the checkpoint `path` can be read: a local path or a bucket folder as they are; a pretrained table name,
  a gs:// or https:// file or an hf-hub: repository as a verified copy in the cache (`paths.local_copy`)."""
  if path in pretrained.CHECKPOINTS:
    path = pretrained.source(path)
  return paths.local_copy(paths.resolve(path))


def checkpoint_format(path: str) -> str:
  """'npz', 'safetensors', 'torch' (by the suffix, after checking that the file's first bytes agree) or 'orbax' (a
  directory holding an orbax checkpoint); anything else is an error saying what the path holds. A remote `path`
  is downloaded first (`local`)."""
  found = local(path)
  if paths.at(found).is_dir():
    orbax_item(found)
    return 'orbax'
  if not paths.at(found).exists():
    raise FileNotFoundError(f'{path}: no such checkpoint file or directory{pretrained.download_hint(path)}')
  fmt, kind = _suffix_format(found), _sniff(found)
  if fmt and kind in _ACCEPTED[fmt]:
    return fmt
  fix = f'rename it to {_RENAME[kind]}' if kind in _RENAME else _FIX.get(kind, 'download it again or give another file')
  if fmt:
    raise ValueError(f'{path} {_LOOKS[kind]}, not {_EXPECTED[fmt]}: {fix}')
  raise ValueError(f'{path} has no checkpoint suffix (.npz, .safetensors, {", ".join(TORCH_SUFFIXES)}) and '
                   f'{_LOOKS[kind]}: {fix}')


def _sniff(path: str) -> str:
  """What the file is, from its first bytes (and a zip's member names): a key of `_LOOKS`."""
  with open(path, 'rb') as f:
    head = f.read(64)
  if not head:
    return 'empty'
  if head.startswith(_ZIP_MAGIC):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
      return 'broken zip'
    if any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names):  # torch.save's zip layout
      return 'torch'
    return 'npz' if all(n.endswith('.npy') for n in names) else 'zip'
  if head.startswith(_NPY_MAGIC):
    return 'npy'
  if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode and a protocol number
    return 'pickle'
  if head[8:9] == b'{':  # safetensors: an 8-byte little-endian header length, then the JSON header
    return 'safetensors'
  if all(b >= 0x20 or b in b'\t\n\r\f' for b in head):
    start = head.lstrip().lower()
    if start.startswith((b'<!doctype html', b'<html')):
      return 'html'
    return 'lfs' if start.startswith(b'version https://git-lfs') else 'text'
  return 'binary'


def _size(num_bytes: int) -> str:
  return f'{num_bytes:,} bytes' if num_bytes < 2**20 else f'{num_bytes / 2**30:,.2f} GiB'


def _npy_header(f, path: str, member: str) -> tuple[tuple, np.dtype]:
  """(shape, dtype) from the .npy header at the start of `f`, member `member` of the .npz `path`."""
  magic = f.read(8)
  if len(magic) < 8 or not magic.startswith(_NPY_MAGIC):
    raise ValueError(f'{path}: member {member} is not a .npy array, so the file is no Mixer .npz: give another file')
  read_header = np.lib.format.read_array_header_1_0 if magic[6] == 1 else np.lib.format.read_array_header_2_0
  try:
    shape, _, dtype = read_header(f)
  except ValueError:  # numpy's header parser rejected it: any reason means the same here
    raise ValueError(f'{path}: member {member} has a malformed .npy header: the file is corrupt; download it '
                     'again') from None
  if dtype.hasobject:
    raise ValueError(f'refusing {path}: it holds pickled Python objects (member {member}), which could run code '
                     'when loaded; save plain arrays instead')
  return shape, dtype


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz archive; every member's header (shape x itemsize) is checked against the bytes the
  member holds before anything is read, so a corrupt header cannot ask for terabytes."""
  arrays = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for member in archive.infolist():
        with archive.open(member) as f:
          shape, dtype = _npy_header(f, path, member.filename)
          needed, held = math.prod(shape) * dtype.itemsize, member.file_size - f.tell()
        if needed > held:
          raise ValueError(f'{path}: member {member.filename} claims a {"x".join(map(str, shape)) or "scalar"} '
                           f'{dtype} array ({_size(needed)}) but holds {_size(held)}: the file is corrupt; '
                           'download it again')
        with archive.open(member) as f:
          arrays[member.filename.removesuffix('.npy')] = np.lib.format.read_array(f, allow_pickle=False)
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
    raise ValueError(f'{path} is not a readable .npz file (truncated or corrupt?): {error}') from None
  return arrays


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(the JSON header, the bytes of tensor data after it), the header's 8-byte length checked against the file."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    length = int.from_bytes(f.read(8), 'little')
    if length > size - 8:
      raise ValueError(f'{path} is truncated or corrupt: its header claims {_size(length)} but the file holds '
                       f'{_size(size)} in all; download it again')
    try:
      header = json.loads(f.read(length))
    except ValueError:  # not UTF-8 or not JSON
      header = None
  if not isinstance(header, dict):
    raise ValueError(f'{path} is corrupt: its header is not a JSON object; download it again')
  return header, size - 8 - length


def _check_safetensors(path: str) -> None:
  """Every tensor's byte range must lie inside the file's data."""
  header, data = _safetensors_header(path)
  for key, info in header.items():
    offsets = info.get('data_offsets') if isinstance(info, dict) and key != '__metadata__' else [0, 0]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
      raise ValueError(f'{path} is corrupt: tensor {key} has no valid data_offsets; download it again')
    if offsets[1] > data:
      raise ValueError(f'{path} is truncated or corrupt: tensor {key} ends at byte {offsets[1]:,} of the data, '
                       f'which holds {_size(data)}; download it again')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  _check_safetensors(path)
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
  """A PyTorch-style state dict from a .safetensors or PyTorch file, local or remote (`local`)."""
  path = local(path)  # once: a remote file's check is a request and a hash of the whole file
  fmt = checkpoint_format(path)
  if fmt == 'safetensors':
    return read_safetensors(path)
  if fmt == 'torch':
    return unwrap_state_dict(read_torch(path))
  raise ValueError(f'{path} is a {fmt} checkpoint, not a PyTorch state dict')


def orbax_item(path: str) -> str:
  """The orbax item directory inside a workdir / checkpoints folder / step directory; an error saying what the
  directory holds instead."""
  item = path
  if paths.at(paths.join(item, 'checkpoints')).is_dir():
    item = paths.join(item, 'checkpoints')
  steps = _committed_steps(item)
  if steps:
    item = paths.join(item, max(steps, key=int))
  if paths.at(paths.join(item, 'default')).is_dir():
    item = paths.join(item, 'default')
  if paths.at(paths.join(item, '_METADATA')).exists():
    return item
  if not any(paths.at(path).iterdir()):
    what = 'is an empty directory'
  elif os.path.basename(item) == 'checkpoints' or paths.at(paths.join(path, 'config.json')).exists():
    what = 'holds no complete checkpoint yet (the training run has not saved one)'
  else:
    what = 'holds no orbax checkpoint (no _METADATA file)'
  raise ValueError(f'{path} {what}: give a training workdir (or its checkpoints/ folder, or one step of it), or '
                   'a folder written by `python -m mixer_jax.convert --to orbax`')


def _committed_steps(folder: str) -> list[str]:
  """The step folders under `folder` that orbax completed: on a disk it renames a step's folder into place when
  complete; in a bucket it writes the step in place and its commit marker last."""
  steps = [p.name for p in paths.at(folder).iterdir() if p.name.isdigit()]
  if paths.is_url(folder):
    from mixer_jax.checkpoint import COMMIT_MARKER
    steps = [s for s in steps if paths.at(paths.join(folder, s, COMMIT_MARKER)).exists()]
  return steps


def read_orbax(path: str) -> dict:
  """{'params': ..., ['batch_stats': ...]} of an orbax checkpoint as numpy arrays (optimizer state and the rest of
  a training state are not read)."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath
  item = epath.Path(orbax_item(paths.resolve(path)))
  # The handler reads the tree alone: a checkpointer would also look for step metadata in the item folder, where
  # orbax's CheckpointManager never writes it, and warn that it is missing.
  tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
  if 'params' not in tree:
    raise ValueError(f'{path}: the orbax checkpoint has no params (keys: {", ".join(tree)})')
  target = {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k]) for k in ('params', 'batch_stats')
            if tree.get(k)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                            partial_restore=True))


def write_orbax(variables: dict, path: str) -> None:
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(paths.resolve(path), variables)
  checkpointer.wait_until_finished()

