"""Reading XLA's optimised HLO text: array sizes, the instructions' definitions, the collectives and their device
groups. `mixer_jax.aot` reports what a compiled step holds from these; nothing here compiles or runs anything.

The text is `compiled.as_text()`: one instruction per line, `%name = <shape> <op>(<operands>), <attributes>`,
where a shape is an array (`bf16[256,768]{1,0}`) or a tuple of them, and operands are names without shapes.
"""
import math
import re

import numpy as np

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
               'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r'|f8\w*)\[([\d,]*)\]')
_DEFINITION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\([^=]*?\)|\S+) ([\w-]+)\((.*?)\)(.*)$', re.M)
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast', 'ragged-all-to-all')
_COLLECTIVE = re.compile(r'^\s*(?:ROOT )?%\S+ = (.*?) (' + '|'.join(COLLECTIVES) + r')(-start)?\((.*)$', re.M)


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dimensions) of each array in a shape (or any text holding shapes)."""
  return [(dtype, tuple(int(d) for d in dims.split(',') if d)) for dtype, dims in _ARRAY.findall(shape_text)]


def array_bytes(shape_text: str) -> int:
  return sum(DTYPE_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in arrays(shape_text))


def definitions(hlo_text: str) -> list[tuple[str, str, str, str, str]]:
  """(name, shape, op, operands, attributes) of each instruction."""
  return _DEFINITION.findall(hlo_text)


def collective_ops(hlo_text: str) -> list[tuple[str, str, str, str]]:
  """(result shape, kind, '-start' or '', the rest of the line) of each collective."""
  return _COLLECTIVE.findall(hlo_text)


def collective_result_bytes(shape: str, kind: str, start: str) -> int:
  """The size of a collective's result per device: the whole buffer of an all-reduce, the gathered array of an
  all-gather, the shard each device keeps of a reduce-scatter."""
  if start and kind in ('all-gather', 'collective-permute'):  # (operands, results[, contexts]) tuples
    return array_bytes(shape.split('), ')[-1] if kind == 'all-gather' else shape) // 2
  return array_bytes(shape)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives, per device, `bytes` being their results' sizes
  (`collective_result_bytes`). An instruction inside a loop counts once."""
  out = {}
  for shape, kind, start, _ in collective_ops(hlo_text):
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += collective_result_bytes(shape, kind, start)
  return out


def replica_groups(attributes: str, devices: int) -> np.ndarray:
  """The device groups of a collective, (groups, size), from its replica_groups in any of XLA's three forms:
  explicit ({{0,1},{2,3}}), iota ([2,4]<=[4,2]T(1,0)) or mesh (mesh['axis_0'=4,'axis_1'=2] {'axis_0'})."""
  match = re.search(r'replica_groups=(\{\{[\d,{} ]*\}\}|\{\})', attributes)
  if match:
    groups = re.findall(r'\{([\d,]+)\}', match[1])
    return np.array([[int(i) for i in g.split(',')] for g in groups]) if groups else np.arange(devices)[None]
  match = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attributes)
  if match:
    shape, dims = [int(v) for v in match[1].split(',')], [int(v) for v in match[2].split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match[3]:
      ids = ids.transpose([int(v) for v in match[3].split(',')])
    return ids.reshape(shape)
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if match:
    axes = re.findall(r"'(\w+)'=(\d+)", match[1])
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    grouped = [names.index(a) for a in re.findall(r"'(\w+)'", match[2])]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    rest = [i for i in range(len(sizes)) if i not in grouped]
    return ids.transpose(rest + grouped).reshape(-1, math.prod(sizes[i] for i in grouped) if grouped else 1)
  return np.arange(devices)[None]
