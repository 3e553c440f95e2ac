"""NVIDIA GPUs this machine does not have: their descriptions, and XLA:GPU's compiler run without a device.

`topology_devices('h100:2x8')` gives compile-only devices of 2 hosts of 8 H100s, over which `mixer_jax.aot`
compiles the real train and eval steps, exactly as for TPU topologies. No driver, no libcuda and no GPU are
needed: the CUDA PJRT plugin (`jax-cuda12-plugin`, `jax-cuda12-pjrt`) compiles for a GPU described by a
`GpuTargetConfigProto` (`target_config`, written here from each card's published figures and CUDA's limits of
its compute capability), and ptxas (`nvidia-cuda-nvcc-cu12`) turns the kernels into machine code.

Those packages never enter a CPU run: they live in their own folder (`COMPILER_DIR`, made by `make gpu-compiler`
from `requirements-gpu-compile.txt`), and `load_compiler` puts them on the path only when a GPU topology is
asked for, after JAX has settled on the CPU. Where JAX's CUDA plugin is installed anyway (a GPU host's
environment, `scripts/gpu_host.sh setup`), that one serves.

What differs from XLA:TPU, and what `mixer_jax.aot` does about it:
- XLA:GPU never refuses a program that is too large. It warns that it "Can't reduce memory use below" its limit
  and compiles; `compile_capturing_log` keeps that warning, which counts as not fitting.
- JAX can use `XLA_PYTHON_CLIENT_MEM_FRACTION` (default 0.75) of a card's memory: it preallocates that much and
  no more (`usable_gib`).
- A compile-only executable has no cost analysis. `step_cost` runs XLA's HloCostAnalysis on the optimised
  module, which counts Triton's GEMM fusions but gives library calls (cuBLAS GEMMs, cuDNN convolutions) 0 FLOPs
  and 0 bytes: those are counted from their operands' shapes (`library_calls`).
- Without a device there is no autotuning, which picks between cuBLAS and Triton for each GEMM on the card. The
  compile here takes cuBLAS for every GEMM (`COMPILE_OPTIONS`): XLA's default Triton tilings, untuned, are refused
  for some GEMMs (DaViT's window projections: "Couldn't find output tile sizes"), compile slower, and moved memory
  and traffic by about 1% where they compiled (Mixer-B/16 at 256 per H100: 20.49 against 20.70 GiB, 130.3 against
  131.1 GB). Memory and FLOPs hardly depend on the choice; time on the card does.
- Collectives travel over NVLink within a host and over the network across hosts (`collective_seconds`).
"""
import contextlib
import math
import os
import re
import sys
import tempfile
from typing import NamedTuple

from mixer_jax import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `make gpu-compiler`: pip install --target of requirements-gpu-compile.txt; MIXER_JAX_GPU_COMPILER moves it.
COMPILER_DIR = os.environ.get('MIXER_JAX_GPU_COMPILER') or os.path.join(ROOT, '.venv', 'gpu-compiler')
DEFAULT_MEM_FRACTION = 0.75  # JAX's preallocation: XLA_PYTHON_CLIENT_MEM_FRACTION
COMPILE_OPTIONS = {'xla_gpu_enable_triton_gemm': False}  # GEMMs in cuBLAS, see the module docstring


class Gpu(NamedTuple):
  """One card's published figures (NVIDIA data sheets; memory as nvidia-smi reports its total) and the CUDA limits
  of its compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability")."""
  device_kind: str  # the CUDA device name, which is JAX's device_kind and nvidia-smi's name
  memory_mib: int
  peak_tflops: float  # dense bfloat16 tensor-core peak, no sparsity
  hbm_gbps: float
  nvlink_gbps: float  # per GPU, each direction (half the data sheet's bidirectional figure)
  sms: int
  boost_ghz: float
  l2_mib: int
  compute_capability: tuple[int, int]
  network_gbps: float  # per host across hosts, each direction, where a bare GPU name is given (DGX-like nodes)


_AMPERE, _HOPPER = (8, 0), (9, 0)
GPUS = {
    # DGX A100: 8 x 200 Gb/s InfiniBand per host; DGX H100 / H200: 8 x 400 Gb/s.
    'a100-40gb': Gpu('NVIDIA A100-SXM4-40GB', 40_960, 312.0, 1_555.0, 300.0, 108, 1.41, 40, _AMPERE, 200.0),
    'a100-80gb': Gpu('NVIDIA A100-SXM4-80GB', 81_920, 312.0, 2_039.0, 300.0, 108, 1.41, 40, _AMPERE, 200.0),
    'h100': Gpu('NVIDIA H100 80GB HBM3', 81_559, 989.0, 3_352.0, 450.0, 132, 1.98, 50, _HOPPER, 400.0),
    'h200': Gpu('NVIDIA H200', 143_771, 989.0, 4_800.0, 450.0, 132, 1.98, 50, _HOPPER, 400.0),
}
GPU_ALIASES = {'a100': 'a100-40gb', 'h100-80gb': 'h100', 'h200-141gb': 'h200'}


class Machine(NamedTuple):
  gpu: str
  gpus: int
  network_gbps: float  # GPU traffic between hosts, each direction, per host (the cloud's published figure)


# Cloud machine types of 8 SXM GPUs (Google Cloud, AWS, Azure documentation), network in GB/s (= Gbps / 8).
MACHINES = {
    'a2-highgpu-8g': Machine('a100-40gb', 8, 12.5),  # 100 Gbps
    'a2-ultragpu-8g': Machine('a100-80gb', 8, 12.5),  # 100 Gbps
    'a3-highgpu-8g': Machine('h100', 8, 100.0),  # GPUDirect-TCPX, 4 x 200 Gbps
    'a3-megagpu-8g': Machine('h100', 8, 200.0),  # GPUDirect-TCPXO, 8 x 200 Gbps
    'a3-ultragpu-8g': Machine('h200', 8, 400.0),  # RDMA, 8 x 400 Gbps
    'p4d.24xlarge': Machine('a100-40gb', 8, 50.0),  # EFA, 400 Gbps
    'p4de.24xlarge': Machine('a100-80gb', 8, 50.0),
    'p5.48xlarge': Machine('h100', 8, 400.0),  # EFA, 3,200 Gbps
    'p5e.48xlarge': Machine('h200', 8, 400.0),
    'standard_nd96asr_v4': Machine('a100-40gb', 8, 200.0),  # InfiniBand, 8 x 200 Gb/s
    'standard_nd96amsr_a100_v4': Machine('a100-80gb', 8, 200.0),
    'standard_nd96isr_h100_v5': Machine('h100', 8, 400.0),  # InfiniBand, 8 x 400 Gb/s
}


class Topology(NamedTuple):
  name: str
  gpu: Gpu
  hosts: int
  gpus_per_host: int
  network_gbps: float

  @property
  def devices(self) -> int:
    return self.hosts * self.gpus_per_host


def gpu_named(name: str) -> str:
  """Our name of a GPU given by our name, an alias, or its CUDA / nvidia-smi name ('NVIDIA H100 80GB HBM3')."""
  key = name.strip().lower()
  key = GPU_ALIASES.get(key, key)
  if key in GPUS:
    return key
  for short, gpu in GPUS.items():
    if key == gpu.device_kind.lower() or (short == 'h200' and key.startswith('nvidia h200')):
      return short
  raise ValueError(f'GPU {name!r} has no description here; known: {", ".join(GPUS)} (or their nvidia-smi names, '
                   f'or a machine type: {", ".join(MACHINES)})')


def is_gpu_topology(name: str) -> bool:
  """Everything that is not a TPU generation (v3, v4, v5e, v5litepod, ...) names GPUs."""
  return not re.match(r'v\d', name.strip())


def topology_name(name: str) -> Topology:
  """'h100:8' (one host of 8), 'h100:2x8' (2 hosts of 8), a machine type ('a3-highgpu-8g', 2 hosts:
  'a3-highgpu-8g:2x8'), or an nvidia-smi name with the counts ('NVIDIA H100 80GB HBM3:2x8')."""
  head, colon, counts = name.rpartition(':') if ':' in name else (name, '', '')
  machine = MACHINES.get(head.strip().lower())
  match = re.fullmatch(r'(?:(\d+)x)?(\d+)', counts.strip()) if colon else None
  if colon and not match:
    raise ValueError(f'topology {name!r}: give <gpu>:<gpus per host> or <gpu>:<hosts>x<gpus per host>, e.g. h100:8, '
                     'h100:2x8, a3-highgpu-8g, a3-highgpu-8g:2x8')
  hosts, per_host = (int(match[1] or 1), int(match[2])) if match else (1, machine.gpus if machine else None)
  if per_host is None:
    raise ValueError(f'topology {name!r}: say how many GPUs, e.g. {head}:8 (one host of 8) or {head}:2x8')
  if machine and per_host != machine.gpus:
    raise ValueError(f'topology {name!r}: {head} hosts have {machine.gpus} GPUs; give {head}:<hosts>x{machine.gpus}')
  if hosts < 1 or not 1 <= per_host <= 16:
    raise ValueError(f'topology {name!r}: hosts must be >= 1 and GPUs per host 1 to 16')
  gpu = GPUS[machine.gpu if machine else gpu_named(head)]
  return Topology(name, gpu, hosts, per_host, machine.network_gbps if machine else gpu.network_gbps)


def usable_gib(gpu: Gpu) -> float:
  """What JAX can allocate on the card: XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of its memory."""
  text = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')
  try:
    fraction = float(text) if text else DEFAULT_MEM_FRACTION
  except ValueError:
    raise ValueError(f'XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} is not a number between 0 and 1') from None
  if not 0 < fraction <= 1:
    raise ValueError(f'XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} is not a number between 0 and 1')
  return gpu.memory_mib / 1024 * fraction


# The limits every compute capability from 8.0 on shares, and those that differ (shared memory in bytes).
_CC_LIMITS = {_AMPERE: dict(shared_memory_per_core=167_936, shared_memory_per_block_optin=166_912, fpus_per_core=64),
              _HOPPER: dict(shared_memory_per_core=233_472, shared_memory_per_block_optin=232_448, fpus_per_core=128)}


def target_config(gpu: Gpu) -> str:
  """The GpuTargetConfigProto (text format) XLA:GPU compiles for, in the fields the pinned plugin knows."""
  limits = _CC_LIMITS[gpu.compute_capability]
  major, minor = gpu.compute_capability
  fields = dict(
      threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49_152,
      shared_memory_per_core=limits['shared_memory_per_core'], threads_per_core_limit=2048, core_count=gpu.sms,
      fpus_per_core=limits['fpus_per_core'], block_dim_limit_x=2**31 - 1, block_dim_limit_y=65_535,
      block_dim_limit_z=65_535, memory_bandwidth=int(gpu.hbm_gbps * 1e9), l2_cache_size=gpu.l2_mib * 2**20,
      clock_rate_ghz=gpu.boost_ghz, device_memory_size=gpu.memory_mib * 2**20,
      shared_memory_per_block_optin=limits['shared_memory_per_block_optin'], registers_per_core_limit=65_536,
      registers_per_block_limit=65_536)
  lines = [f'  {key}: {value}' for key, value in fields.items()]
  return ('gpu_device_info {\n' + '\n'.join(lines) + f'\n  cuda_compute_capability {{ major: {major} minor: {minor} }}'
          '\n}\nplatform_name: "CUDA"\ndnn_version_info { major: 9 minor: 8 patch: 0 }\n'
          f'device_description_str: "{gpu.device_kind}"\n')


# ------------------------------------------------------------------------------------------------ the compiler
# The plugin's notices that this machine has no GPU, and XLA's alarm that a compile takes minutes (asking for a bug
# report: full-size models take that long here on every compile).
_NOISE = ('cudart_stub.cc', 'Could not find cuda drivers', 'All log messages before absl::InitializeLog',
          'slow_operation_alarm', 'Very slow compile?')


@contextlib.contextmanager
def compile_capturing_log():
  """Collects what XLA writes to stderr (file descriptor 2) meanwhile into the yielded list of lines; on leaving,
  writes them back, less the plugin's notices that there is no GPU here."""
  lines = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as log:
    os.dup2(log.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      log.seek(0)
      lines.extend(log.read().decode(errors='replace').splitlines())
      kept = [line for line in lines if line.strip(' *') and not any(n in line for n in _NOISE)]
      if kept:
        print('\n'.join(kept), file=sys.stderr, flush=True)


def compiler_dir() -> str | None:
  return COMPILER_DIR if os.path.isdir(os.path.join(COMPILER_DIR, 'jax_plugins', 'xla_cuda12')) else None


_INSTALL = 'make gpu-compiler (pip install --target .venv/gpu-compiler -r requirements-gpu-compile.txt)'


def load_compiler() -> dict:
  """Makes JAX's CUDA plugin available for compile-only topologies; returns the compile options (cuBLAS GEMMs, the
  pinned ptxas).

  JAX must not start a CUDA backend here (without a driver it prints a traceback): the CPU must be its platform
  (`cli.tpu_compiler_environment`, which bench's compile and the tests call)."""
  import jax
  from jax._src import xla_bridge
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  own = compiler_dir()
  if own and own not in sys.path:
    sys.path.append(own)  # after the environment's packages: nothing there is shadowed
  if 'cuda' in platforms.split(','):
    raise ValueError('JAX_PLATFORMS includes cuda: compile for GPUs with JAX_PLATFORMS=cpu')
  with compile_capturing_log():
    jax.devices()  # discovers the plugins on the path (a GPU host's jax[cuda12], or ours before JAX started)
    if 'cuda' not in xla_bridge._topology_factories:
      if not own:
        raise ValueError(f'cannot compile for GPUs here: XLA:GPU\'s compiler is not installed; run {_INSTALL}')
      from jax_plugins import xla_cuda12  # JAX started before ours was on the path
      xla_cuda12.initialize()
  nvcc = os.path.join(own, 'nvidia', 'cuda_nvcc') if own else None
  return dict(COMPILE_OPTIONS, **({'xla_gpu_cuda_data_dir': nvcc} if nvcc and os.path.isdir(nvcc) else {}))


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the topology's hosts (process_index tells a device's host)."""
  from jax.experimental import topologies
  with compile_capturing_log():
    devices = topologies.get_topology_desc(platform='cuda', target_config=target_config(topology.gpu),
                                           topology=f'1x{topology.hosts}x{topology.gpus_per_host}').devices
  return list(devices)


# ------------------------------------------------------------------------------------------ reading the program
def _int_list(text: str, key: str) -> list[int]:
  match = re.search(rf'"{key}":\[([^\]]*)\]', text)
  return [int(v) for v in re.findall(r'\d+', match[1])] if match else []


def _gemm_flops(result, lhs, config) -> float:
  contracting = _int_list(config, 'lhs_contracting_dimensions')
  return 2.0 * math.prod(result) * math.prod(lhs[d] for d in contracting)


def _conv_flops(kind, result, operands, attributes) -> float:
  """2 x (output positions of the forward convolution) x (kernel elements), for each of cuDNN's three passes."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', attributes)
  if kind == 'forward':
    output, kernel = result, operands[1]
  elif kind == 'backward input':
    output, kernel = operands[0], operands[1]
  else:  # backward filter: (input, output gradient) -> kernel gradient
    output, kernel = operands[1], result
  feature = labels[3].index('f') if labels else len(output) - 1
  return 2.0 * math.prod(d for i, d in enumerate(output) if i != feature) * math.prod(kernel)


_LIBRARY = {'__cublas$gemm': 'gemm', '__cublas$lt$matmul': 'gemm', '__cublas$lt$matmul$f8': 'gemm',
            '__cudnn$convForward': 'forward', '__cudnn$convBiasActivationForward': 'forward',
            '__cudnn$convBackwardInput': 'backward input', '__cudnn$convBackwardFilter': 'backward filter'}


def library_calls(hlo_text: str) -> dict:
  """{'flops', 'bytes', 'calls', 'uncounted'}: the cuBLAS GEMMs' and cuDNN convolutions' FLOPs from their operands'
  shapes, the bytes they read and write; custom calls of unknown cost are listed in 'uncounted'."""
  shapes = {name: shape for name, shape, _, _, _ in hlo.definitions(hlo_text)}
  out = dict(flops=0.0, bytes=0, calls=0, uncounted=[])
  for name, shape, op, operands, attributes in hlo.definitions(hlo_text):
    if op != 'custom-call':
      continue
    target = re.search(r'custom_call_target="([^"]+)"', attributes)
    kind = _LIBRARY.get(target[1]) if target else None
    if kind is None:
      out['uncounted'].append(target[1] if target else name)
      continue
    operand_shapes = [hlo.arrays(shapes.get(o.strip().lstrip('%'), ''))
                      for o in operands.split(',') if o.strip()]
    operand_dims = [a[0][1] if a else () for a in operand_shapes]
    result = hlo.arrays(shape)[0][1]  # the first element of the (result, workspace) tuple
    out['flops'] += (_gemm_flops(result, operand_dims[0], attributes) if kind == 'gemm'
                     else _conv_flops(kind, result, operand_dims, attributes))
    out['bytes'] += hlo.array_bytes(shape.split('s8[')[0]) + sum(
        hlo.array_bytes(shapes.get(o.strip().lstrip('%'), '')) for o in operands.split(',') if o.strip())
    out['calls'] += 1
  return out


def step_cost(executable) -> dict:
  """{'flops', 'bytes accessed', 'library_calls'} of a compiled GPU step per device: XLA's HloCostAnalysis of the
  optimised module (through JAX's internal binding, as compiled.cost_analysis() is not implemented for compile-only
  GPU executables) plus the library calls it counts as free."""
  import jax
  from jax._src.lib import _jax
  module = executable._executable.xla_extension_executable().hlo_modules()[0]
  cost = _jax.hlo_module_cost_analysis(jax.devices('cpu')[0].client, module)
  calls = library_calls(executable.as_text())
  return {'flops': float(cost.get('flops', 0.0)) + calls['flops'],
          'bytes accessed': float(cost.get('bytes accessed', 0.0)) + calls['bytes'], 'library_calls': calls}


def out_of_memory(log_lines: list[str]) -> str | None:
  """XLA:GPU's warning that the program needs more memory than its limit, if it gave one."""
  return next((line[line.index("Can't reduce"):].strip() for line in log_lines if "Can't reduce memory use" in line),
              None)


# ----------------------------------------------------------------------------------------------- collectives
def _ring_bytes(kind: str, size: int, n: int) -> float:
  """Bytes each of n members sends in a ring implementation of the collective; `size` is its result per device."""
  if n < 2:
    return 0.0
  if kind == 'all-reduce':
    return 2 * (n - 1) / n * size
  if kind == 'reduce-scatter':  # the result is one member's shard
    return (n - 1) * size
  return (n - 1) / n * size  # all-gather (of the gathered result), all-to-all


def collective_seconds(hlo_text: str, topology: Topology, hosts_of: list[int]) -> dict:
  """Lower bounds on the time of the step's collectives, per device and added up: the bytes a ring sends over
  NVLink among a group's members on one host, and over the network where the group spans hosts (hierarchically:
  each host's share of the data crosses once through that host's NICs). A collective permute sends its buffer
  once, over the network where source and target sit on different hosts. `hosts_of[i]` is the host of XLA's
  logical device i (the mesh's i-th device)."""
  nvlink = network = 0.0  # bytes per GPU over NVLink, per host over the network
  for shape, kind, start, attributes in hlo.collective_ops(hlo_text):
    size = hlo.collective_result_bytes(shape, kind, start)
    if kind == 'collective-permute':
      pairs = [(int(a), int(b)) for a, b in re.findall(r'\{(\d+),(\d+)\}', attributes)]
      crossing = [hosts_of[a] for a, b in pairs if hosts_of[a] != hosts_of[b]]
      if crossing:
        network += size * max(crossing.count(h) for h in set(crossing))
      elif pairs:
        nvlink += size
      continue
    group = hlo.replica_groups(attributes, len(hosts_of))[0]
    hosts = len({hosts_of[i] for i in group})
    on_a_host = len(group) // hosts
    nvlink += _ring_bytes(kind, size, on_a_host) if hosts > 1 else _ring_bytes(kind, size, len(group))
    if hosts > 1:
      full = size * len(group) if kind == 'reduce-scatter' else size
      network += on_a_host * size * (hosts - 1) / hosts if kind == 'all-to-all' else (
          (2 if kind == 'all-reduce' else 1) * (hosts - 1) / hosts * full)
  return {'nvlink_ms': nvlink / (topology.gpu.nvlink_gbps * 1e9) * 1e3,
          'network_ms': network / (topology.network_gbps * 1e9) * 1e3}
