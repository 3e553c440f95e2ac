"""Benchmarks, one argparse sub-command each:

  python -m mixer_jax.bench model --model mixer_b16,davit_tiny --mode train,infer --batch 256 --dtype bfloat16
  python -m mixer_jax.bench input --pp "decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)"
  python -m mixer_jax.bench checkpoint --model mixer_b16 --batch 32 --every 10 --steps 20  (train step time +- saves)
  python -m mixer_jax.bench checkpoint --model mixer_b16 --storage_only --workdir /tmp --workdir gs://BUCKET/PATH
  python -m mixer_jax.bench compile --config=configs/mixer_i1k.py --topology=v3:8x8|h100:8  (mixer_jax/aot.py)
  python -m mixer_jax.bench compile-table --platform=tpu|gpu  (BENCHMARKS.md's compile tables, compile_tables.py)

`model`: the real train step (`trainer.make_train_step`, the function train.py runs, with the optimizer, loss
and mixup of the family's recipe) or the inference forward pass, on a mesh over all devices, fed synthetic
on-device batches (input cost excluded: that is `input`). Compilation and warm-up steps are excluded; each
timed repeat runs `--steps` steps and blocks on the result, and the median repeat is reported. MFU =
images/s x FLOPs per image / peak FLOP/s, with the FLOPs from XLA's cost analysis of the compiled step (the
analytic count of `mixer_jax.flops` beside it; for `scan_blocks=True` the analytic count, as XLA counts a loop
body once) and the peak from `peak_tflops()` or `--peak_tflops`.
`--baseline` also times a plain jit of the bare linen model + the same optax optimizer (`plain_train_step`),
its repeats taking turns with ours, and reports our step time over its. The logic is `model_benchmark()`; rows
print as a table and, with `--jsonl`, append as JSON lines.

`input`: writes synthetic photo-like JPEGs of ImageNet-like sizes (about 100 KB each, as ImageNet's ~110 KB
average) to a temporary image folder, runs the train pipeline (`mixer_jax.data.train_iter`) over them and prints
images/s in total and per CPU core (the input pipeline runs on the host CPUs). The logic is
`input_throughput()`; `write_image_folder()` also serves tests.

A new benchmark adds an `_add_<name>_parser(subparsers)` that sets `run=` to its entry function and calls it
from `main`.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from mixer_jax import cli, paths

# (height, width) of common ImageNet photos: 500 x 375 / 333 at both orientations dominate; mean ~400 x 350.
IMAGENET_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 500), (300, 400), (480, 640))
DEFAULT_PP = 'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(1000)'


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """A uint8 RGB image that compresses like a photo: smooth colour fields, edges and fine texture."""
  import tensorflow as tf  # only the benchmark and tests need TF here
  low = rng.uniform(0, 255, (max(height // 48, 2), max(width // 48, 2), 3)).astype(np.float32)
  smooth = tf.image.resize(low[None], (height, width), method='bicubic')[0].numpy()
  edges = 60.0 * (np.add.outer(np.arange(height) // 37, np.arange(width) // 53) % 2)[:, :, None]
  texture = rng.normal(0.0, 18.0, (height, width, 3))
  return np.clip(smooth + edges + texture, 0, 255).astype(np.uint8)


def write_image_folder(root: str, num_images: int, *, sizes=IMAGENET_SIZES, num_classes: int = 10,
                       split: str = 'train', seed: int = 0, quality: int = 90) -> str:
  """`root/<split>/class_<k>/<i>.jpg` with synthetic images, class k = i % num_classes; returns root."""
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    directory = os.path.join(root, split, f'class_{i % num_classes}')
    os.makedirs(directory, exist_ok=True)
    h, w = sizes[i % len(sizes)]
    jpeg = tf.io.encode_jpeg(synthetic_image(h, w, rng), quality=quality)
    tf.io.write_file(os.path.join(directory, f'{i:06d}.jpg'), jpeg)
  return root


def append_jsonl(path: str | None, row: dict) -> None:
  """Appends `row` as one JSON line to `path` (the commands' --jsonl; None: nowhere)."""
  if path:
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def cpu_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def input_throughput(pp: str = DEFAULT_PP, *, batch_size: int = 256, num_images: int = 1024, steps: int = 20,
                     warmup: int = 3, sizes=IMAGENET_SIZES, cache: str | None = None, workdir: str | None = None):
  """Images/s of `train_iter` with `pp` over synthetic JPEGs: {'images_per_s', 'per_core', 'cores', ...}."""
  from mixer_jax import data
  from mixer_jax.data import sources
  with tempfile.TemporaryDirectory(dir=workdir) as root:
    write_image_folder(root, num_images, sizes=sizes)
    it = data.train_iter(sources.IMAGEFOLDER_PREFIX + root, 'train', pp=pp, global_batch_size=batch_size, seed=0,
                         process_index=0, process_count=1, cache=cache)
    for _ in range(warmup):  # tracing, thread pools, the first shuffle window, the page cache
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(it)
    seconds = time.perf_counter() - start
  cores = cpu_cores()
  images_per_s = steps * batch_size / seconds
  return {'images_per_s': images_per_s, 'per_core': images_per_s / cores, 'cores': cores, 'seconds': seconds,
          'batch_shapes': {k: v.shape for k, v in batch.items()}}


def _run_input(args):
  r = input_throughput(args.pp, batch_size=args.batch_size, num_images=args.num_images, steps=args.steps,
                       warmup=args.warmup, cache=args.cache, workdir=args.workdir)
  print(f'input pipeline: {args.pp}')
  print(f'  {args.num_images} synthetic JPEGs of ImageNet-like sizes, batch {args.batch_size}, {args.steps} timed '
        f'steps after {args.warmup} warm-up, cache={args.cache}; batch {r["batch_shapes"]}')
  print(f'  {r["images_per_s"]:.1f} images/s total, {r["per_core"]:.1f} images/s per core ({r["cores"]} CPU cores)')


def _add_input_parser(subparsers):
  p = subparsers.add_parser('input', help='input pipeline throughput on synthetic JPEGs')
  p.add_argument('--pp', default=DEFAULT_PP, help='train pre-processing string')
  p.add_argument('--batch_size', type=cli.at_least(1), default=256)
  p.add_argument('--num_images', type=cli.at_least(1), default=1024, help='synthetic JPEGs written (one epoch)')
  p.add_argument('--steps', type=cli.at_least(1), default=20, help='timed batches')
  p.add_argument('--warmup', type=cli.at_least(0), default=3, help='untimed batches first')
  p.add_argument('--cache', choices=('raw', 'decoded'), default=None)
  p.add_argument('--workdir', default=None, help='where the temporary image folder goes (default: $TMPDIR)')
  p.set_defaults(run=_run_input)


# ----------------------------------------------------------------------------------------------------- model
# Dense bfloat16 peak TFLOP/s of GPUs that mixer_jax.gpus does not describe (vendor data sheets, no sparsity); TPUs
# are in mixer_jax.aot.TPUS, the GPUs one compiles for in mixer_jax.gpus.GPUS. The first entry whose name is in the
# `device_kind` wins.
GPU_PEAK_TFLOPS = (('H100', 989.0), ('H200', 989.0), ('H800', 989.0), ('A100', 312.0), ('L4', 121.0),
                   ('A10G', 70.0), ('RTX 4090', 165.0))
RECIPES = {'mixer': 'mixer_i1k', 'convmixer': 'convmixer_i1k', 'davit': 'davit_i1k'}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def peak_tflops(device_kind: str) -> float | None:
  """Peak TFLOP/s per JAX device of this kind (a TPU v3 device is a core, later TPUs a chip); None: unknown."""
  from mixer_jax import aot, gpus
  if device_kind in aot.TPUS_BY_KIND:
    return aot.TPUS_BY_KIND[device_kind].peak_tflops
  described = [gpu for gpu in gpus.GPUS.values() if gpu.device_kind == device_kind]
  if described:
    return described[0].peak_tflops
  return next((tf for kind, tf in GPU_PEAK_TFLOPS if kind in device_kind), None)


def parse_mesh(text: str) -> tuple[int, ...]:
  """--mesh: 'data,fsdp,model' sizes, '(-1,1,1)' style."""
  try:
    return tuple(int(x) for x in text.strip('()').split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not three comma-separated sizes such as -1,1,1') from None


def bench_config(name: str, *, batch: int, res: int | None = None, dtype: str = 'float32', recipe: str | None = None,
                 mesh_shape=(-1, 1, 1), model_options: dict | None = None):
  """The family's recipe (a name in configs/ or a recipe file, with its [:args]; default <family>_i1k) with
  `name` (and `model_options`) as its model."""
  from mixer_jax import models
  path, colon, arg = (recipe or RECIPES[models.family(name)]).partition(':')
  if not path.endswith('.py'):  # a name: configs/<name>.py of this checkout
    path = os.path.join(CONFIGS, f'{path}.py')
  c = cli.load_recipe(path + colon + arg)
  c.model.name = name
  c.model.dtype = dtype
  if res:
    c.model.image_size = res
  for key, value in (model_options or {}).items():
    c.model[key] = value
  c.input.batch_size = batch
  c.mesh.shape = tuple(mesh_shape)
  # The recipe's per-GPU groups (BatchNorm: ConvMixer's 64 images; mixup: 64 or 128) need a batch that is a multiple
  # of them; any other batch is timed with the global batch as one group, the same FLOPs.
  if c.model.get('bn_group_size') and batch % c.model.bn_group_size:
    c.model.bn_group_size = None
  if c.mixup.group_size and batch % c.mixup.group_size:
    c.mixup.group_size = None
  return c


def _time_calls(calls: dict[str, Callable[[], Any]], *, steps: int, repeats: int,
                warmup: int) -> dict[str, list[float]]:
  """Seconds per call of each repeat of `steps` calls, for each of `calls` (which return what to block on).

  The calls take turns repeat by repeat, so that a drift in the machine's speed (other load, the allocator's
  state) reaches each of them alike.
  """
  import jax
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(steps):
        out = call()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / steps)
  return times


def synthetic_batch(model, batch: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  from mixer_jax import models
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, models.input_shape(model, batch)).astype(np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch)]
  return {'image': images, 'labels': labels}


def plain_train_step(model, tx):
  """The baseline: what one writes with nothing but linen and optax (no mesh, mixup or metrics)."""
  import jax
  import optax

  def loss_fn(params, batch_stats, images, labels, rng):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    (logits, _), updated = model.apply(variables, images, train=True, rngs={'dropout': rng},
                                       mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy(logits, labels).mean()
    return loss, updated.get('batch_stats', batch_stats)

  @jax.jit
  def step(params, opt_state, batch_stats, images, labels, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels,
                                                                           rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, loss

  return step


class Step(NamedTuple):
  """A compiled train or inference step with its inputs, ready to time."""
  model: Any
  mode: str
  mesh: Any
  tx: Any
  state: Any  # the train state (its variables serve inference)
  host_batch: dict
  compiled: Any
  call: Callable[[], Any]  # runs one step, returns what to block on
  compile_s: float

  def xla_flops_per_image(self) -> float:
    """XLA's cost analysis is of the partitioned program that each device runs."""
    flops = float(self.compiled.cost_analysis().get('flops', 0.0))
    return flops * self.mesh.devices.size / len(self.host_batch['image'])


def compile_step(name: str, *, mode: str = 'train', batch: int = 32, res: int | None = None, dtype: str = 'float32',
                 recipe: str | None = None, mesh_shape=(-1, 1, 1), model_options: dict | None = None) -> Step:
  import jax
  from mixer_jax import aot, sharding, trainer
  if mode not in ('train', 'infer'):
    raise ValueError(f"mode {mode!r}: choose 'train' or 'infer'")
  config = bench_config(name, batch=batch, res=res, dtype=dtype, recipe=recipe, mesh_shape=mesh_shape,
                        model_options=model_options)
  mesh = sharding.make_mesh(config.mesh.shape)
  sharding.check_batch_size(batch, mesh)
  run = aot.build(config, mesh)  # the schedule's values do not change the step's cost
  model, tx, shardings = run.model, run.tx, run.shardings
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0), shardings)
  host_batch = synthetic_batch(model, batch, config.num_classes)
  data = sharding.global_batch(host_batch, mesh)

  start = time.perf_counter()
  if mode == 'train':
    compiled = run.train_step.lower(state, data).compile()
    current = state

    def call():
      nonlocal current
      current, metrics = compiled(current, data)  # the state is donated: feed each step the last one
      return metrics
  else:
    variables = trainer.model_variables(state)
    data = dict(data, mask=sharding.global_batch({'mask': np.ones(batch, bool)}, mesh)['mask'])
    compiled = run.eval_step.lower(variables, data).compile()
    call = lambda: compiled(variables, data)
  return Step(model, mode, mesh, tx, state, host_batch, compiled, call, time.perf_counter() - start)


def model_benchmark(name: str, *, mode: str = 'train', batch: int = 32, res: int | None = None,
                    dtype: str = 'float32', recipe: str | None = None, mesh_shape=(-1, 1, 1), steps: int = 5,
                    repeats: int = 5, warmup: int = 2, peak: float | None = None, baseline: bool = False,
                    model_options: dict | None = None) -> dict:
  """One benchmark row (see the module docstring) as a dict of plain values."""
  from mixer_jax import flops, models, trainer
  if baseline and mode != 'train':
    raise ValueError('--baseline compares train steps: use it with --mode train')
  step = compile_step(name, mode=mode, batch=batch, res=res, dtype=dtype, recipe=recipe, mesh_shape=mesh_shape,
                      model_options=model_options)
  calls = {'step': step.call}
  if baseline:  # built before our first step, which consumes (donates) the initial state the baseline copies
    calls['baseline'], baseline_compile_s = _baseline(step)
  all_times = _time_calls(calls, steps=steps, repeats=repeats, warmup=warmup)
  times = all_times['step']
  step_s = float(np.median(times))
  devices = step.mesh.devices.size
  kind = step.mesh.devices.flat[0].device_kind
  peak = peak or peak_tflops(kind)
  xla, analytic = step.xla_flops_per_image(), flops.flops_per_image(step.model, mode)
  scanned = getattr(step.model, 'scan_blocks', False)  # XLA's cost analysis counts a loop body once
  images_per_s = batch / step_s
  mfu = lambda flops_per_image: images_per_s * flops_per_image / (peak * 1e12 * devices) if peak else None
  row = dict(model=name, mode=mode, batch=batch, res=models.input_shape(step.model)[1], dtype=dtype,
             devices=devices, device_kind=kind, mesh=dict(step.mesh.shape),
             recipe=recipe or RECIPES[models.family(name)], step_s=step_s, step_s_repeats=times,
             images_per_s=images_per_s, images_per_s_per_device=images_per_s / devices,
             xla_gflops_per_image=xla / 1e9, analytic_gflops_per_image=analytic / 1e9,
             xla_over_analytic=xla / analytic, peak_tflops_per_device=peak,
             mfu_flops='analytic' if scanned else 'xla',
             mfu=mfu(analytic if scanned else xla), mfu_analytic=mfu(analytic),
             compile_s=step.compile_s, **trainer.memory_usage(step.compiled))
  if baseline:
    baseline_s = float(np.median(all_times['baseline']))
    row.update(baseline_step_s=baseline_s, baseline_step_s_repeats=all_times['baseline'],
               baseline_compile_s=baseline_compile_s, step_over_baseline=step_s / baseline_s)
  return row


def _baseline(step: Step) -> tuple[Callable[[], Any], float]:
  """`plain_train_step` on the default device with the same model, optimizer, initial state and batch: a call
  that runs one step, and its compile time."""
  import jax
  params, batch_stats = jax.device_get(step.state.params), jax.device_get(step.state.batch_stats)
  opt_state, rng = step.tx.init(params), jax.random.PRNGKey(1)
  images, labels = step.host_batch['image'], step.host_batch['labels']
  start = time.perf_counter()
  plain = plain_train_step(step.model, step.tx).lower(params, opt_state, batch_stats, images, labels, rng).compile()
  compile_s = time.perf_counter() - start

  def call():
    nonlocal params, opt_state, batch_stats
    params, opt_state, batch_stats, loss = plain(params, opt_state, batch_stats, images, labels, rng)
    return loss
  return call, compile_s


_COLUMNS = (  # header, key, format
    ('model', 'model', '{}'), ('mode', 'mode', '{}'), ('res', 'res', '{}'), ('batch', 'batch', '{}'),
    ('dtype', 'dtype', '{}'), ('dev', 'devices', '{}'), ('img/s', 'images_per_s', '{:.1f}'),
    ('img/s/dev', 'images_per_s_per_device', '{:.1f}'), ('step ms', 'step_s', '{:.4g}'),
    ('GFLOP/img XLA', 'xla_gflops_per_image', '{:.4g}'), ('XLA/analytic', 'xla_over_analytic', '{:.3f}'),
    ('MFU', 'mfu', '{:.1%}'), ('compile s', 'compile_s', '{:.1f}'), ('step GiB', 'step_gib', '{:.2f}'),
    ('vs plain', 'step_over_baseline', '{:.3f}'))


def format_row(row: dict) -> str:
  cells = []
  for _, key, fmt in _COLUMNS:
    value = row.get(key)
    if key == 'step_s':
      value = value * 1e3
    cells.append('-' if value is None else fmt.format(value))
  return '| ' + ' | '.join(cells) + ' |'


def table_header() -> str:
  return '| ' + ' | '.join(h for h, _, _ in _COLUMNS) + ' |\n|' + '---|' * len(_COLUMNS)


def _run_model(args):
  from mixer_jax import models
  names = args.model.split(',')
  for name in names:
    models.variant(name)  # an unknown name fails before anything is compiled, listing the known ones
  modes = args.mode.split(',')
  options = cli.parse_options(args.model_options, '--model_options')
  print(table_header(), flush=True)
  for name in names:
    for mode in modes:
      row = model_benchmark(name, mode=mode, batch=args.batch, res=args.res, dtype=args.dtype, recipe=args.recipe,
                            mesh_shape=args.mesh, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                            peak=args.peak_tflops, baseline=args.baseline and mode == 'train',
                            model_options=options)
      print(format_row(row), flush=True)
      if row['mfu_flops'] == 'analytic':
        print('  note: scanned blocks: XLA\'s cost analysis counts the loop body once, so GFLOP/img XLA is low '
              'and MFU uses the FLOPs of mixer_jax.flops', flush=True)
      elif abs(row['xla_over_analytic'] - 1) > 0.1:  # e.g. XLA:CPU runs grouped-convolution gradients densely
        print(f'  note: XLA executes {row["xla_over_analytic"]:.1f}x the model FLOPs of mixer_jax.flops here; '
              f'the MFU of the model FLOPs is in the JSON (mfu_analytic)', flush=True)
      append_jsonl(args.jsonl, row)


def _add_model_parser(subparsers):
  p = subparsers.add_parser('model', help='train or inference step: images/s, MFU, memory, compile time')
  p.add_argument('--model', required=True, help='model name(s), comma-separated, e.g. mixer_b16,davit_tiny')
  p.add_argument('--model_options', default='', help='model overrides key=value,..., e.g. num_blocks=2')
  p.add_argument('--mode', default='train', help='train, infer or train,infer')
  p.add_argument('--batch', type=cli.at_least(1), default=32, help='global batch')
  p.add_argument('--res', type=cli.at_least(1), default=None, help='image size (default: the model\'s, 224)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='compute dtype (parameters '
                 'and norms stay float32)')
  p.add_argument('--recipe', default=None, help='a recipe giving optimizer, loss, mixup: a name in configs/ or a '
                 'file, with [:args] (default: <family>_i1k)')
  p.add_argument('--mesh', type=parse_mesh, default=(-1, 1, 1),
                 help='mesh shape data,fsdp,model (default -1,1,1: data parallel over every device)')
  p.add_argument('--steps', type=cli.at_least(1), default=5, help='steps per timed repeat')
  p.add_argument('--repeats', type=cli.at_least(1), default=5, help='timed repeats; the median is reported')
  p.add_argument('--warmup', type=cli.at_least(0), default=2, help='untimed steps after compilation')
  p.add_argument('--peak_tflops', type=cli.at_least(0, float, exclusive=True), default=None,
                 help='peak TFLOP/s per device for MFU (default: from the device kind; none on CPU)')
  p.add_argument('--baseline', action='store_true', help='also time a plain linen + optax step (train only)')
  p.add_argument('--jsonl', default=None, help='append one JSON object per row to this file')
  p.set_defaults(run=_run_model)


# ------------------------------------------------------------------------------------------------ checkpoint
def checkpoint_benchmark(name: str, *, batch: int = 32, every: int = 10, steps: int = 20, repeats: int = 3,
                         model_options: dict | None = None, workdirs: Sequence[str | None] = (None,), saves: int = 3,
                         storage_only: bool = False) -> dict:
  """What checkpoints cost a run of the real train step, written to a temporary folder in each of `workdirs` (a
  local directory, None for $TMPDIR, or a bucket, gs://...), removed at the end.

  The storages: `saves` rounds, each saving the state once into every storage in turn, each save timed from the
  call to the checkpoint's commit (`Checkpointer.wait`), with the time the call blocks; then as many rounds of
  restores of the newest one, verified against its checksums (`Checkpointer.restore`). Medians, and each storage's
  over the first's.
  The run (unless `storage_only`), in the first storage: the step's median time per step without checkpoints and
  with `Checkpointer(async_save=True)` saving every `every` steps, their repeats taking turns (`_time_calls`); also
  the median time a save call blocks and that of the checksum pass alone. A repeat with checkpoints ends when its
  last save is committed, so a background write never spills into the other call's time: the ratio is an upper
  bound on what saving costs a run.
  """
  import jax
  from mixer_jax import checkpoint
  if steps < every and not storage_only:
    raise ValueError(f'--steps {steps} < --every {every}: a timed repeat would save no checkpoint; give --steps '
                     '>= --every')
  step = compile_step(name, batch=batch, model_options=model_options)
  state = step.state
  row = dict(model=name, batch=batch, devices=step.mesh.devices.size,
             state_gib=sum(x.nbytes for x in jax.tree.leaves(state)) / 2**30)
  with contextlib.ExitStack() as folders:
    ckpts = [checkpoint.Checkpointer(folders.enter_context(_scratch_folder(w)), keep=2, async_save=True)
             for w in workdirs]
    for ckpt in ckpts:
      ckpt.save(0, state)  # compiles the checksum pass and sets orbax up, untimed
      ckpt.wait()
    if not storage_only:
      state, times = _step_times(step, state, ckpts[0], every=every, steps=steps, repeats=repeats)
      row.update(times)
    row['storages'] = _storage_times(ckpts, state, saves)
    for ckpt in ckpts:
      ckpt.close()
  for storage, workdir in zip(row['storages'], workdirs):
    storage['storage'] = workdir or tempfile.gettempdir()
  return row


def _step_times(step, state, ckpt, *, every: int, steps: int, repeats: int) -> tuple[Any, dict]:
  import jax
  from mixer_jax import checkpoint, sharding
  data = sharding.global_batch(step.host_batch, step.mesh)
  counts, blocking, warmup = {False: 0, True: 0}, [], 1

  def train(saving: bool):
    def call():
      nonlocal state
      state, metrics = step.compiled(state, data)  # the state is donated: feed each step the last one
      counts[saving] = n = counts[saving] + 1
      if saving and n % every == 0:
        jax.block_until_ready(state)  # the steps dispatched ahead finish here, not inside the save's time
        start = time.perf_counter()
        ckpt.save(n, state)
        blocking.append(time.perf_counter() - start)
      if saving and (n - warmup) % steps == 0:  # the last call of the warm-up or of a timed repeat
        ckpt.wait()
      return metrics
    return call

  times = _time_calls({'without': train(False), 'with': train(True)}, steps=steps, repeats=repeats, warmup=warmup)
  checksum_s = []
  for _ in range(3):
    start = time.perf_counter()
    checkpoint.checksums(state)
    checksum_s.append(time.perf_counter() - start)
  without, with_saves = float(np.median(times['without'])), float(np.median(times['with']))
  return state, dict(every=every, steps=steps, repeats=repeats, step_s=without, step_s_with_saves=with_saves,
                     ratio=with_saves / without, step_s_repeats=times['without'],
                     step_s_with_saves_repeats=times['with'], saves=len(blocking),
                     save_blocking_s=float(np.median(blocking)), checksum_s=float(np.median(checksum_s)))


def _storage_times(ckpts: list, state, saves: int) -> list[dict]:
  """Per checkpointer: medians of `saves` saves (blocking, commit) and restores, the checkpointers taking turns."""
  import jax
  from mixer_jax import checkpoint
  blocks, commits, restores = ([[] for _ in ckpts] for _ in range(3))
  for n in range(1, saves + 1):
    for i, ckpt in enumerate(ckpts):
      start = time.perf_counter()
      ckpt.save(n, state)
      blocks[i].append(time.perf_counter() - start)
      ckpt.wait()
      commits[i].append(time.perf_counter() - start)
  target = checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  for _ in range(saves):
    for i, ckpt in enumerate(ckpts):
      start = time.perf_counter()
      jax.block_until_ready(ckpt.restore(target))
      restores[i].append(time.perf_counter() - start)
  rows = [dict(saves=saves, save_blocking_s=float(np.median(b)), commit_s=float(np.median(c)),
               restore_s=float(np.median(r))) for b, c, r in zip(blocks, commits, restores)]
  for row in rows:
    row.update({f'{k}_ratio': row[k] / rows[0][k] for k in ('save_blocking_s', 'commit_s', 'restore_s')})
  return rows


@contextlib.contextmanager
def _scratch_folder(workdir: str | None):
  """A new folder in `workdir` (local, default $TMPDIR, or gs://...), removed with what is in it at the end."""
  if workdir is None or not paths.is_url(workdir):
    with tempfile.TemporaryDirectory(dir=workdir) as root:
      yield root
    return
  paths.check_writable(workdir, '--workdir')
  root = paths.join(workdir, f'bench_checkpoint.{os.getpid()}.{time.time_ns()}')
  try:
    yield root
  finally:
    if paths.at(root).exists():
      paths.at(root).rmtree()


def _run_checkpoint(args):
  from mixer_jax import models
  models.variant(args.model)  # an unknown name fails before anything is compiled, listing the known ones
  row = checkpoint_benchmark(args.model, batch=args.batch, every=args.every, steps=args.steps, repeats=args.repeats,
                             model_options=cli.parse_options(args.model_options, '--model_options'),
                             workdirs=args.workdir or [None], saves=args.saves, storage_only=args.storage_only)
  print(f'{row["model"]}, train state {row["state_gib"]:.3f} GiB; medians:')
  if not args.storage_only:
    print(f'  train step, batch {row["batch"]} on {row["devices"]} devices, {row["repeats"]} repeats of '
          f'{row["steps"]} steps taking turns, in {row["storages"][0]["storage"]}: without checkpoints '
          f'{row["step_s"] * 1e3:.1f} ms/step; with an async save every {row["every"]} steps '
          f'{row["step_s_with_saves"] * 1e3:.1f} ms/step: ratio {row["ratio"]:.3f}')
    print(f'  a save call blocks {row["save_blocking_s"] * 1e3:.1f} ms ({row["saves"]} saves); the checksum pass in '
          f'it takes {row["checksum_s"] * 1e3:.1f} ms alone')
  for i, storage in enumerate(row['storages']):
    ratios = '' if i == 0 else (f' (x{storage["save_blocking_s_ratio"]:.2f}, x{storage["commit_s_ratio"]:.2f}, '
                                f'x{storage["restore_s_ratio"]:.2f} the first\'s)')
    print(f'  {storage["storage"]}: {storage["saves"]} saves, the call blocks {storage["save_blocking_s"]:.2f} s, '
          f'committed {storage["commit_s"]:.2f} s after the call; a verified restore {storage["restore_s"]:.2f} s'
          f'{ratios}')
  append_jsonl(args.jsonl, row)


def _add_checkpoint_parser(subparsers):
  p = subparsers.add_parser('checkpoint', help='what checkpoints cost: the train step time without and with async '
                            'saves, and the save, commit and restore times of storages')
  p.add_argument('--model', required=True, help='model name, e.g. mixer_b16')
  p.add_argument('--model_options', default='', help='model overrides key=value,..., e.g. num_blocks=2')
  p.add_argument('--batch', type=cli.at_least(1), default=32, help='global batch')
  p.add_argument('--every', type=cli.at_least(1), default=10, help='steps between checkpoints')
  p.add_argument('--steps', type=cli.at_least(1), default=20, help='steps per timed repeat (>= --every)')
  p.add_argument('--repeats', type=cli.at_least(1), default=3, help='timed repeats of each; the median is reported')
  p.add_argument('--saves', type=cli.at_least(1), default=3, help='saves (and restores) timed in each storage')
  p.add_argument('--storage_only', action='store_true', help='time the saves and restores only, no train steps')
  p.add_argument('--workdir', action='append', help='where the temporary checkpoints go: a directory (default: '
                 '$TMPDIR) or a bucket, gs://BUCKET/PATH; give it again to compare storages, timed in turns')
  p.add_argument('--jsonl', default=None, help='append the row as one JSON object to this file')
  p.set_defaults(run=_run_checkpoint)


# --------------------------------------------------------------------------------------------------- compile
def _run_compile(args):
  cli.tpu_compiler_environment()
  config = cli.load_config(args.config_args)
  from mixer_jax import aot
  given = ' '.join(args.config_args)
  if args.max_batch:
    print(f'largest global batch of {given} on {args.topology} (a compile per try):', flush=True)
    result = aot.max_batch(config, args.topology, log=lambda line: print(line, flush=True))
    report = dict(result['report'], max_batch=result['max_batch'], max_batch_tries=result['tries'])
    print(f'largest batch that fits: {result["max_batch"]} ({result["max_batch"] // result["data_parallel"]} per '
          f'data-parallel device)')
  else:
    print(f'compiling {given} for {args.topology} ...', flush=True)
    report = aot.compile_run(config, args.topology, steps=('train',) if args.train_only else ('train', 'eval'))
  print(aot.format_report(report))
  append_jsonl(args.jsonl, dict(report, config=args.config_args))
  if not report['train']['fits']:
    sys.exit(f'error: the train step does not fit on {args.topology}{aot.over_text(report["train"])}: shard '
             'parameters and optimizer state (FSDP, --config.mesh.shape="(1,-1,1)"), rematerialise '
             '(--config.model.remat=full), lower the batch or use more devices (a larger slice, more hosts)')


def _add_compile_parser(subparsers):
  p = subparsers.add_parser(
      'compile', help='compile a recipe for a TPU topology or GPU hosts on this machine: memory, FLOPs, '
      'collectives, roofline',
      description='python -m mixer_jax.bench compile --config=configs/<recipe>.py[:args] --topology=v3:8x8|h100:8 '
                  '[--config.field=value ...]: the train and eval steps train.py would build, compiled by '
                  'XLA:TPU or XLA:GPU for the topology (see mixer_jax/aot.py and mixer_jax/gpus.py). Exits 1 when '
                  'the train step does not fit.')
  p.add_argument('--topology', required=True, help='TPUs: <generation>:<chip grid> (v3:8x8, v4:4x4x4, v5e:4x4, '
                 'v5p:2x2x1, v6e:4x4) or an accelerator type (v3-128, v4-128, v5litepod-16, v5p-128, v6e-16); GPUs: '
                 '<gpu>:<gpus per host> or <gpu>:<hosts>x<gpus per host> (a100-40gb, a100-80gb, h100, h200, e.g. '
                 'h100:8, h100:2x8) or a machine type (a2-highgpu-8g, a2-ultragpu-8g, a3-highgpu-8g, '
                 'a3-megagpu-8g, a3-ultragpu-8g, p4d.24xlarge, p5.48xlarge, ...; 2 hosts: a3-highgpu-8g:2x8)')
  p.add_argument('--max_batch', action='store_true', help='find the largest global batch whose train step fits')
  p.add_argument('--train_only', action='store_true', help='compile the train step only')
  p.add_argument('--jsonl', default=None, help='append the report as one JSON object to this file')
  p.set_defaults(run=_run_compile)


def _run_compile_table(args):
  cli.tpu_compiler_environment()
  from mixer_jax import compile_tables
  if args.table_from:
    with open(args.table_from) as f:
      reports = {compile_tables.key_of(r['config'], r['topology'], 'max_batch' in r): r for r in map(json.loads, f)}
    print(compile_tables.header(args.platform))
    for row in compile_tables.ROWS[args.platform]:
      report = reports.get(compile_tables.key_of(row.config, row.topology, row.max_batch))
      if report:
        print(compile_tables.format_row(row, report, args.platform))
    return
  rows = compile_tables.rows_of(args.platform, args.shard)
  print(compile_tables.header(args.platform), flush=True)
  failed = []
  for row in rows:
    try:
      report = compile_tables.run_row(row)
    except cli.USER_ERRORS as error:  # the other rows still compile; the command fails at the end
      failed.append(row.label)
      print(f'| {row.label} | {row.topology} | error: {str(error).splitlines()[0]} |', flush=True)
      continue
    print(compile_tables.format_row(row, report, args.platform), flush=True)
    append_jsonl(args.jsonl, dict(report, config=list(row.config)))
  if failed:
    sys.exit(f'error: {len(failed)} of {len(rows)} rows failed to compile: {"; ".join(failed)}')


def _add_compile_table_parser(subparsers):
  p = subparsers.add_parser(
      'compile-table', help="BENCHMARKS.md's compile tables: every recipe compiled for the hardware it names",
      description='python -m mixer_jax.bench compile-table --platform=tpu|gpu [--shard=I/N] [--jsonl FILE]: each '
                  'row of mixer_jax/compile_tables.py compiled (as bench compile --train_only), printed as a '
                  'markdown table row.')
  p.add_argument('--platform', required=True, choices=('tpu', 'gpu'))
  p.add_argument('--shard', default='0/1', help='I/N: compile every N-th row from the I-th (run N processes)')
  p.add_argument('--jsonl', default=None, help='append each row\'s report as one JSON object to this file')
  p.add_argument('--table_from', default=None, help='print the table of the reports in this JSON-lines file')
  p.set_defaults(run=_run_compile_table)


def main(argv=None):
  parser = cli.ArgumentParser(prog='python -m mixer_jax.bench', description='\n\n'.join(__doc__.split('\n\n')[:2]))
  subparsers = parser.add_subparsers(dest='command', required=True)
  _add_model_parser(subparsers)
  _add_input_parser(subparsers)
  _add_compile_parser(subparsers)
  _add_compile_table_parser(subparsers)
  _add_checkpoint_parser(subparsers)
  args, rest = parser.parse_known_args(argv)
  if args.command == 'compile':  # --config=... and --config.field=value, read as train.py reads them
    args.config_args = [a for a in rest if a.startswith('--config')]
    rest = [a for a in rest if not a.startswith('--config')]
  if rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  for path in ('jsonl', 'workdir', 'table_from'):  # ~, relative (mixer_jax/paths.py)
    value = getattr(args, path, None)
    if value:
      setattr(args, path, [paths.resolve(v) for v in value] if isinstance(value, list) else paths.resolve(value))
  if getattr(args, 'jsonl', None):
    cli.run(lambda: cli.check_output_file(args.jsonl, '--jsonl'))
  cli.run(lambda: args.run(args))

def script() -> None:
  """`python -m mixer_jax.bench` (and the `mixer-jax-bench` command pyproject.toml installs)."""
  cli.preload_tcmalloc()
  main()


if __name__ == '__main__':
  script()
