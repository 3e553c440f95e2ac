"""Ahead-of-time compilation for TPUs and GPUs this machine does not have: does a run fit, how fast can it be?

libtpu's compiler runs on any Linux CPU, and so does XLA:GPU's (`mixer_jax.gpus`). `compile_run(config,
topology)` builds exactly what train.py builds from a config (`trainer.build`: model, optimizer, mesh,
shardings, train and eval steps) over the devices of a TPU topology (`v3:8x8`, or the accelerator type
`v3-128`) or of GPU hosts (`h100:8`, `h100:2x8`, `a3-highgpu-8g`), compiles its train and eval steps for
abstract inputs (nothing is allocated, nothing runs, no data is read) and reads the compiled programs:

- memory: XLA's memory analysis per device (arguments, outputs, temporaries) against what a program may use
  (a TPU's HBM; on a GPU, JAX's share of the card, `gpus.usable_gib`); XLA:TPU refuses a program that does not
  fit, with what it needed, and XLA:GPU warns that it cannot reduce its memory below the limit;
- cost: XLA's cost analysis per device (FLOPs, bytes of HBM traffic), next to `mixer_jax.flops` (on GPUs with
  the library calls counted from their shapes, `gpus.step_cost`);
- collectives: every all-reduce, all-gather, reduce-scatter, ... in the optimised HLO, with its result size
  (on GPUs also the time they take at least over NVLink and the network, `gpus.collective_seconds`);
- a roofline bound: a step can take no less than max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), which
  caps images/s and MFU. It is a bound from the compiler's counts, not a measurement; XLA:TPU's own cost
  model (`optimal_seconds`, summed per operation) is reported beside it.

`max_batch(config, topology)` finds the largest global batch whose train step fits, by compiling.
The schedule's length is a constant in the program and does not change its cost: steps are built for a
nominal `NOMINAL_STEPS` unless the config gives `total_steps`. Scanned blocks (`scan_blocks=True`) compile
to a loop whose body XLA's cost analysis counts once: their FLOPs and bytes are not the step's, so no
roofline is given for them (compile with `--config.model.scan_blocks=False` for it).

Must not: run steps, read datasets or checkpoints beyond an image folder's class folders (`trainer.count_classes`) and
what `trainer.build` reads (`config.init`).
"""
import math
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixer_jax import checkpoint, config_checks, flops, gpus, hlo, models, sharding, trainer

NOMINAL_STEPS = 10_000


class Chip(NamedTuple):
  """One JAX device: the memory a program may use, dense bfloat16 peak and HBM bandwidth (for TPUs: Cloud TPU
  docs; GPUs: `gpus.GPUS`)."""
  device_kind: str
  hbm_gib: float
  peak_tflops: float
  hbm_gbps: float
  megacore: bool  # one JAX device per chip of two TensorCores (v4, v5p); v3 has one device per core


# Per JAX device. v3: a chip is 2 devices (cores), 32 GiB, 123 TFLOP/s and 900 GB/s in all.
TPUS = {
    'v3': Chip('TPU v3', 16.0, 61.5, 450.0, False),
    'v4': Chip('TPU v4', 32.0, 275.0, 1200.0, True),
    'v5e': Chip('TPU v5 lite', 16.0, 197.0, 819.0, False),
    'v5p': Chip('TPU v5', 95.0, 459.0, 2765.0, True),
    'v6e': Chip('TPU v6 lite', 32.0, 918.0, 1640.0, False),
}
TPUS_BY_KIND = {chip.device_kind: chip for chip in TPUS.values()}
_ACCELERATOR_ALIASES = {'v5litepod': 'v5e'}  # gcloud's accelerator type of v5e slices


def topology_name(name: str) -> tuple[str, tuple[int, ...]]:
  """(generation, chip grid) of 'v3:8x8' or of a Cloud TPU accelerator type such as 'v3-128', 'v4-128',
  'v5litepod-16': the default slice shapes of a power-of-two number of chips (v3-128 is 64 chips, 8x8)."""
  generations = ', '.join(TPUS)
  match = re.fullmatch(r'(v\w+?):(\d+(?:x\d+){1,2})', name)
  if match:
    generation, grid = match[1], tuple(int(n) for n in match[2].split('x'))
  else:
    match = re.fullmatch(r'(v\w+?)-(\d+)', name)
    if not match:
      raise ValueError(f'topology {name!r}: give <generation>:<chip grid> (v3:8x8, v4:4x4x4, v5e:4x4, v5p:2x2x1, '
                       'v6e:4x4) or an accelerator type (v3-128, v4-128, v5litepod-16, v5p-128, v6e-16)')
    generation = _ACCELERATOR_ALIASES.get(match[1], match[1])
    if generation not in TPUS:
      raise ValueError(f'topology {name!r}: unknown TPU generation {match[1]!r}; known: {generations}')
    count = int(match[2])
    chips = count // 2 if generation in ('v3', 'v4', 'v5p') else count  # their type counts TensorCores
    if chips < 1 or chips & (chips - 1):
      raise ValueError(f'topology {name!r}: {chips} chips has no default slice shape here; give the chip grid, '
                       f'e.g. {generation}:4x4x12')
    sides, k = (3 if TPUS[generation].megacore else 2), chips.bit_length() - 1
    # the default slice shapes: sides as equal as possible, the larger ones last (v3-128: 8x8, v4-256: 4x4x8)
    grid = (2, 2, 1) if sides == 3 and k == 2 else tuple(2 ** (k // sides + (i >= sides - k % sides))
                                                         for i in range(sides))
  if generation not in TPUS:
    raise ValueError(f'topology {name!r}: unknown TPU generation {generation!r}; known: {generations}')
  return generation, grid


def topology_devices(name: str, *, num_slices: int = 1) -> list:
  """The devices of `num_slices` TPU slices of topology `name` (see `topology_name`), for compiling."""
  from jax.experimental import topologies
  generation, grid = topology_name(name)
  chip = TPUS[generation]
  per_host = tuple(min(n, 2) for n in grid) + (1,) * (3 - len(grid))  # a TPU VM host holds up to 2x2 chips
  try:
    topology = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{generation}:{"x".join(map(str, grid))}', num_slices=num_slices,
        chip_config_name='megacore' if chip.megacore else 'default', chips_per_host_bounds=per_host)
  except jax.errors.JaxRuntimeError as error:
    raise ValueError(f'topology {name!r}: {str(error).splitlines()[0]}') from None
  except RuntimeError as error:  # no TPU plugin: libtpu is not installed
    raise ValueError(f'cannot compile for TPUs here ({str(error).splitlines()[0]}): install libtpu, '
                     '`pip install libtpu==0.0.42.1` (requirements-dev.txt)') from None
  return list(topology.devices)


def chip_of(device) -> Chip:
  if device.device_kind not in TPUS_BY_KIND:
    raise ValueError(f'no HBM, peak or bandwidth figures for {device.device_kind!r}; known: '
                     f'{", ".join(TPUS_BY_KIND)}')
  return TPUS_BY_KIND[device.device_kind]


# ------------------------------------------------------------------------------------------------ the program
def build(config, mesh) -> trainer.Run:
  """`trainer.build` with the config's durations where it gives steps, nominal ones otherwise."""
  trainer.count_classes(config)
  config_checks.check(config)
  warmup = config.schedule.get('warmup_steps')
  total = config.get('total_steps') or max(NOMINAL_STEPS, 10 * (warmup or 0))
  warmup = total // 10 if warmup is None else warmup  # epochs or examples would need the dataset's size
  return trainer.build(config, mesh, total_steps=total, warmup_steps=warmup)


def abstract_batch(model, config, mesh, *, eval_mask: bool = False) -> dict:
  """ShapeDtypeStructs of one global batch as the train (or, with the mask, the eval) step takes it."""
  batch, spec = config.input.batch_size, sharding.batch_sharding(mesh)
  out = {'image': jax.ShapeDtypeStruct(models.input_shape(model, batch), jnp.float32, sharding=spec),
         'labels': jax.ShapeDtypeStruct((batch, config.num_classes), jnp.float32, sharding=spec)}
  if eval_mask:
    out['mask'] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=spec)
  return out


class Target(NamedTuple):
  """What a topology compiles for: its devices, their Chip, and for GPU hosts their description and the
  compiler's options."""
  devices: list
  chip: Chip
  gpu: gpus.Topology | None = None
  compiler_options: dict | None = None


class Compiled(NamedTuple):
  executable: Any  # None when the compiler refused the program
  seconds: float
  out_of_memory: str | None  # the compiler's message when the program does not fit


def _compile(step, *args, target: Target) -> Compiled:
  start = time.perf_counter()
  lowered = step.lower(*args)
  if target.gpu:
    with gpus.compile_capturing_log() as log:
      executable = lowered.compile(compiler_options=target.compiler_options)
    return Compiled(executable, time.perf_counter() - start, gpus.out_of_memory(log))
  try:
    executable = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    return Compiled(None, time.perf_counter() - start, str(error).strip().splitlines()[0])
  return Compiled(executable, time.perf_counter() - start, None)


# ------------------------------------------------------------------------------------------ reading the program
_SIZE = re.compile(r'(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?\b')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def out_of_memory_gib(message: str) -> tuple[float, float] | None:
  """(needed, available) GiB from XLA:TPU's out-of-memory message, e.g. 'the total memory required for HLO
  temporaries (26.39G) exceeds available HBM (15.48G)' or 'Used 20.12G of 15.48G hbm'."""
  for pattern in (r'required[^(]*\(([\d.]+[KMGT]?)\)[^(]*available[^(]*\(([\d.]+[KMGT]?)\)',
                  r'[Uu]sed ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm'):
    match = re.search(pattern, message)
    if match:
      sizes = [_SIZE.fullmatch(m) for m in match.groups()]
      return tuple(float(s[1]) * _UNITS[s[2]] / 2**30 for s in sizes)
  return None


def analyse(compiled: Compiled, *, target: Target, devices: int, batch: int, analytic_flops_per_image: float,
            scanned: bool, hosts_of: list[int]) -> dict:
  """What the compiler says of one step, per device; see the module docstring."""
  chip = target.chip
  row = dict(compile_s=round(compiled.seconds, 1), hbm_capacity_gib=chip.hbm_gib,
             analytic_gflops_per_image=analytic_flops_per_image / 1e9)
  if compiled.executable is None:
    needed = out_of_memory_gib(compiled.out_of_memory)
    row.update(fits=False, compiler_message=compiled.out_of_memory)
    if needed:
      row.update(needed_gib=needed[0], available_gib=needed[1], over_gib=needed[0] - needed[1])
    return row
  memory = trainer.compiled_memory(compiled.executable)
  fits = memory['step_gib'] <= chip.hbm_gib and compiled.out_of_memory is None
  row.update(fits=fits, **memory, free_gib=chip.hbm_gib - memory['step_gib'])
  if compiled.out_of_memory:  # XLA:GPU compiled it anyway
    row.update(compiler_message=compiled.out_of_memory)
  hlo_text = compiled.executable.as_text()
  cost = gpus.step_cost(compiled.executable) if target.gpu else compiled.executable.cost_analysis()
  step_flops, step_bytes = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  comms = hlo.collectives(hlo_text)
  per_image = devices / batch
  row.update(xla_gflops_per_device=step_flops / 1e9, xla_gflops_per_image=step_flops * per_image / 1e9,
             xla_over_analytic=step_flops * per_image / analytic_flops_per_image,
             gb_accessed_per_device=step_bytes / 1e9, mb_accessed_per_image=step_bytes * per_image / 1e6,
             collectives=comms, collective_mb_per_device=sum(c['bytes'] for c in comms.values()) / 1e6,
             # its estimate overflows to negative values for the largest programs (Mixer-H/14 at 1,024 per chip)
             xla_optimal_ms=float(cost['optimal_seconds']) * 1e3 if cost.get('optimal_seconds', -1) > 0 else None)
  if target.gpu:
    calls = cost['library_calls']
    row.update(library_calls=dict(count=calls['calls'], gflops_per_device=calls['flops'] / 1e9,
                                  uncounted=sorted(set(calls['uncounted']))),
               collective_time=gpus.collective_seconds(hlo_text, target.gpu, hosts_of))
  if scanned:  # the loop body is counted once: no bound from these counts
    row.update(roofline=None)
    return row
  compute_s, memory_s = step_flops / (chip.peak_tflops * 1e12), step_bytes / (chip.hbm_gbps * 1e9)
  bound_s = max(compute_s, memory_s)
  analytic_per_device = analytic_flops_per_image * batch / devices
  row['roofline'] = dict(
      compute_ms=compute_s * 1e3, memory_ms=memory_s * 1e3, step_ms=bound_s * 1e3,
      bound_by='compute' if compute_s >= memory_s else 'HBM bandwidth',
      images_per_s_per_device=batch / devices / bound_s if bound_s else None,
      mfu=analytic_per_device / (bound_s * chip.peak_tflops * 1e12) if bound_s else None)
  return row


def target_of(topology: str, *, num_slices: int = 1) -> Target:
  """The devices and figures of a TPU topology (`topology_name`) or of GPU hosts (`gpus.topology_name`)."""
  if not gpus.is_gpu_topology(topology):
    devices = topology_devices(topology, num_slices=num_slices)
    return Target(devices, chip_of(devices[0]))
  gpu_topology = gpus.topology_name(topology)
  if num_slices > 1:
    raise ValueError(f'config.mesh.dcn_shape spans TPU slices; GPU hosts ({topology}) take one mesh over all '
                     'their devices, whose leading axis spans the hosts: drop dcn_shape')
  options = gpus.load_compiler()
  gpu = gpu_topology.gpu
  chip = Chip(gpu.device_kind, gpus.usable_gib(gpu), gpu.peak_tflops, gpu.hbm_gbps, False)
  return Target(gpus.topology_devices(gpu_topology), chip, gpu_topology, options)


def topology_mesh(config, topology: str):
  """(the config's mesh over the topology's devices, their Target); `config.mesh.dcn_shape` spans TPU slices."""
  dcn = config.mesh.get('dcn_shape')
  target = target_of(topology, num_slices=math.prod(dcn) if dcn else 1)
  return sharding.make_mesh(config.mesh.shape, dcn_shape=dcn, devices=target.devices), target


def compile_run(config, topology: str, *, steps=('train', 'eval')) -> dict:
  """Compiles the config's train and/or eval step for `topology`; returns the report as plain values."""
  mesh, target = topology_mesh(config, topology)
  chip = target.chip
  batch = config.input.batch_size
  sharding.check_batch_size(batch, mesh)
  run = build(config, mesh)
  state = checkpoint.abstract_like(run.shapes, run.shardings)
  scanned = bool(getattr(run.model, 'scan_blocks', False))
  common = dict(target=target, devices=mesh.devices.size, batch=batch, scanned=scanned,
                hosts_of=[d.process_index for d in mesh.devices.flat])
  report = dict(
      topology=topology, device_kind=chip.device_kind, devices=mesh.devices.size, mesh=dict(mesh.shape),
      model=config.model.name, dtype=str(jnp.dtype(run.model.dtype)),
      parameters=models.count_params(run.shapes.params), global_batch=batch,
      batch_per_device=batch / mesh.devices.size, remat=str(getattr(run.model, 'remat', False)),
      scan_blocks=scanned, peak_tflops=chip.peak_tflops, hbm_gbps=chip.hbm_gbps, memory_gib=chip.hbm_gib)
  if target.gpu:
    gpu = target.gpu
    report.update(platform='gpu', hosts=gpu.hosts, gpus_per_host=gpu.gpus_per_host,
                  card_memory_gib=gpu.gpu.memory_mib / 1024, nvlink_gbps=gpu.gpu.nvlink_gbps,
                  network_gbps=gpu.network_gbps)
  else:
    report.update(platform='tpu')
  if 'train' in steps:
    report['train'] = analyse(_compile(run.train_step, state, abstract_batch(run.model, config, mesh), target=target),
                              analytic_flops_per_image=flops.flops_per_image(run.model, 'train'), **common)
  if 'eval' in steps:
    variables = trainer.model_variables(state)
    report['eval'] = analyse(_compile(run.eval_step, variables,
                                      abstract_batch(run.model, config, mesh, eval_mask=True), target=target),
                             analytic_flops_per_image=flops.flops_per_image(run.model, 'infer'), **common)
  return report


def search_max_batch(try_batch, *, start: int, unit: int, capacity_gib: float, limit: int = 2**24):
  """The largest multiple of `unit` for which `try_batch(batch) -> (fits, GiB needed)` fits, or None, and the
  batches tried. The next try lies on the line through the memory of the nearest fitting and failing tries at
  `capacity_gib` (memory grows about linearly with the batch), kept inside the inner three quarters of that
  bracket, so that every try narrows it; until a try fails, the batch grows along the line through the two
  largest tries."""
  tried = {}
  batch = max(unit, start // unit * unit)
  while True:
    tried[batch] = try_batch(batch)
    fitting = [b for b, (fits, _) in tried.items() if fits]
    failing = [b for b, (fits, _) in tried.items() if not fits]
    lo, hi = max(fitting, default=0), min(failing, default=None)
    if (hi is not None and hi - lo <= unit) or (hi is None and lo >= limit):
      return (lo or None), sorted(tried)
    if hi is None:  # past the line through the two largest tries, by 25% to 16x
      b0, b1 = sorted(fitting)[-2:] if len(fitting) > 1 else (0, lo)
      m0 = tried[b0][1] if b0 else 0.0
      slope = (tried[b1][1] - m0) / (b1 - b0) if len(fitting) > 1 else 0.0
      guess = b1 + 1.05 * (capacity_gib - tried[b1][1]) / slope if slope > 0 else 2 * lo
      batch = int(min(max(guess, 1.25 * lo), 16 * lo)) // unit * unit
      continue
    (m_lo, m_hi) = (tried[lo][1] if lo else 0.0), tried[hi][1]
    guess = lo + (capacity_gib - m_lo) * (hi - lo) / (m_hi - m_lo) if math.isfinite(m_hi) and m_hi > m_lo else None
    margin = (hi - lo) / 8
    guess = (lo + hi) / 2 if guess is None else min(max(guess, lo + margin), hi - margin)
    batch = min(max(int(guess) // unit * unit, lo + unit), hi - unit)


def batch_unit(config, mesh) -> int:
  """The step between the global batches a config can take on a mesh: a multiple of the data-parallel devices
  and accumulation steps, and of the recipe's per-GPU groups (mixup's, and BatchNorm's in each micro-batch)."""
  accum = config.get('accum_steps') or 1
  groups = (config.mixup.get('group_size') or 1, (config.model.get('bn_group_size') or 1) * accum)
  return math.lcm(sharding.data_parallel_size(mesh) * accum, *groups)


def max_batch(config, topology: str, *, log=print) -> dict:
  """The largest global batch (a multiple of `batch_unit`) whose train step fits on `topology`, with the report
  at that batch. Each try is a compile (`search_max_batch`)."""
  config = config.copy_and_resolve_references()
  mesh, target = topology_mesh(config, topology)
  unit = batch_unit(config, mesh)
  reports = {}

  def try_batch(batch):
    config.input.batch_size = batch
    reports[batch] = report = compile_run(config, topology, steps=('train',))
    train = report['train']
    need = train['step_gib'] if 'step_gib' in train else train.get('needed_gib', math.inf)
    log(f'  batch {batch}: {"fits" if train["fits"] else "does not fit"} ({need:.2f} GiB per device), '
        f'compiled in {train["compile_s"]:.0f} s')
    return train['fits'], need

  best, tried = search_max_batch(try_batch, start=config.input.batch_size, unit=unit,
                                 capacity_gib=target.chip.hbm_gib)
  if best is None:
    raise ValueError(f'not even a batch of {unit} (the smallest the mesh and the recipe\'s groups allow) fits on '
                     f'{topology}: shard the parameters (FSDP, --config.mesh.shape="(1,-1,1)"), rematerialise '
                     '(--config.model.remat=full) or use more devices (a larger slice, more hosts)')
  return dict(max_batch=best, data_parallel=sharding.data_parallel_size(mesh), tries=tried, report=reports[best])


# ---------------------------------------------------------------------------------------------------- output
def _ms(value):
  return f'{value:,.2f} ms' if value < 100 else f'{value:,.0f} ms'


def format_step(name: str, row: dict) -> list[str]:
  if 'step_gib' not in row:  # the compiler refused it
    return [f'{name} step: refused by the compiler after {row["compile_s"]:.1f} s',
            f'  HBM: does not fit{over_text(row)}: {row["compiler_message"]}']
  lines = [f'{name} step: compiled in {row["compile_s"]:.1f} s']
  verdict = (f'fits, {row["free_gib"]:.2f} GiB free' if row['fits']
             else f'does not fit by {-row["free_gib"]:.2f} GiB' if row['free_gib'] < 0
             else 'does not fit: XLA could not bring it under its limit')
  if 'compiler_message' in row:
    verdict += f'; XLA: {row["compiler_message"]}'
  lines += [
      f'  HBM per device: {row["step_gib"]:.2f} GiB of {row["hbm_capacity_gib"]:.4g} GiB ({verdict}): arguments '
      f'{row["arguments_gib"]:.2f}, outputs {row["outputs_gib"]:.2f} ({row["aliased_gib"]:.2f} donated), '
      f'temporaries {row["temporaries_gib"]:.2f}',
      f'  FLOPs: {row["xla_gflops_per_device"]:,.1f} GFLOP per device per step, {row["xla_gflops_per_image"]:.2f} '
      f'GFLOP per image (mixer_jax.flops: {row["analytic_gflops_per_image"]:.2f}, XLA/analytic '
      f'{row["xla_over_analytic"]:.3f})' + library_text(row),
      f'  HBM traffic: {row["gb_accessed_per_device"]:,.2f} GB per device per step, '
      f'{row["mb_accessed_per_image"]:,.1f} MB per image']
  comms = ', '.join(f'{kind} x{c["count"]} ({c["bytes"] / 1e6:,.1f} MB)' for kind, c in row['collectives'].items())
  lines.append(f'  collectives per device: {comms or "none"}')
  if 'collective_time' in row:
    t = row['collective_time']
    lines.append(f'  collectives\' time at least: {_ms(t["nvlink_ms"])} over NVLink, {_ms(t["network_ms"])} over the '
                 'network between hosts (beside the roofline: they may overlap the compute)')
  bound = row['roofline']
  if bound is None:
    lines.append('  roofline: none: scanned blocks are a loop whose body XLA counts once (FLOPs and bytes above '
                 'are one iteration); compile with --config.model.scan_blocks=False for the bound')
  else:
    lines.append(f'  roofline: compute {_ms(bound["compute_ms"])}, HBM {_ms(bound["memory_ms"])} -> a step takes '
                 f'at least {_ms(bound["step_ms"])} ({bound["bound_by"]}-bound): at most '
                 f'{bound["images_per_s_per_device"]:,.0f} images/s per device, MFU at most {bound["mfu"]:.0%}')
  if row['xla_optimal_ms'] is not None:
    lines.append(f'  XLA:TPU cost model: {_ms(row["xla_optimal_ms"])} per step at best')
  return lines


def library_text(row) -> str:
  calls = row.get('library_calls')
  if not calls:
    return ''
  text = (f'; of which {calls["count"]} cuBLAS/cuDNN calls {calls["gflops_per_device"]:,.1f} GFLOP, counted from '
          'their shapes')
  return text + (f'; not counted: {", ".join(calls["uncounted"])}' if calls['uncounted'] else '')


def over_text(row) -> str:
  return (f' by {row["over_gib"]:.2f} GiB (needs {row["needed_gib"]:.2f}, {row["available_gib"]:.2f} available)'
          if 'over_gib' in row else '')


def device_text(report: dict) -> str:
  text = f'{report["peak_tflops"]:g} TFLOP/s, {report["hbm_gbps"]:g} GB/s, '
  if report['platform'] != 'gpu':
    return text + f'{report["memory_gib"]:g} GiB each'
  hosts = f'{report["hosts"]} hosts of {report["gpus_per_host"]}' if report['hosts'] > 1 else 'one host'
  return text + (f'{report["card_memory_gib"]:.2f} GiB each of which JAX may use {report["memory_gib"]:.2f} '
                 f'(XLA_PYTHON_CLIENT_MEM_FRACTION); {hosts}, NVLink {report["nvlink_gbps"]:g} GB/s per GPU'
                 + (f', network {report["network_gbps"]:g} GB/s per host' if report['hosts'] > 1 else ''))


def format_report(report: dict) -> str:
  mesh = ' x '.join(f'{axis} {n}' for axis, n in report['mesh'].items())
  lines = [
      f'{report["model"]} ({report["parameters"]:,} parameters, {report["dtype"]}, remat {report["remat"]}'
      f'{", scanned blocks" if report["scan_blocks"] else ""}) on {report["topology"]}: {report["devices"]} x '
      f'{report["device_kind"]} ({device_text(report)}), mesh {mesh}, global batch '
      f'{report["global_batch"]} ({report["batch_per_device"]:g} per device)',
      f'Figures are what {"XLA:GPU" if report["platform"] == "gpu" else "XLA:TPU"}\'s compiler counts for the '
      'compiled program, per device' + (' (GEMMs in cuBLAS: no autotuning without a GPU)' if report['platform'] ==
                                        'gpu' else '') + '; the roofline is a lower bound from those counts, not a '
      'measurement.']
  for name in ('train', 'eval'):
    if name in report:
      lines += format_step(name, report[name])
  return '\n'.join(lines)

