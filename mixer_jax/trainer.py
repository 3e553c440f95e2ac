"""Training: the train state, the jitted train step, and the loop, in the order things happen.

The state is everything a run needs to continue (params, optimizer state, BatchNorm statistics, step, rng) and
nothing else; the step's randomness is fold_in(rng, step) and the data stream a pure function of (seed, step),
so a run resumed from a checkpoint ends with exactly the parameters of an uninterrupted one.

Steps are `jax.jit` with explicit shardings over one ('data', 'fsdp', 'model') mesh and donated state. Metrics
stay on device between log steps (no host sync per step); at a log step they are fetched, checked for non-finite
values (the run stops naming the first bad step and quantity) and written through one clu writer (logs,
TensorBoard, metrics.jsonl). Evaluations are the `mixer_jax.evaluators` classes, one per `config.evals` entry.
A fine-tuning run reads `config.init` at its first start only and records in config.json what it decided about
the model.

This module must not know evaluation kinds, checkpoint formats or pre-processing: evaluators/, checkpoint.py,
convert/ and data/ own them.
"""
import functools
import json
import math
import os
import resource
import shutil
import tempfile
import time
from typing import Any, NamedTuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, parameter_overview
from jax.experimental import multihost_utils

from mixer_jax import (checkpoint, cli, config_checks, convert, data, evaluators, losses, mixup, models, optim, paths,
                       sharding)
from mixer_jax.evaluators import classification


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied
  params: Any
  opt_state: Any
  batch_stats: Any  # {} for models without BatchNorm
  rng: jax.Array  # raw uint32 key; step t uses fold_in(rng, t)


def resolve_steps(config, name: str, *, num_examples: int | None, batch_size: int) -> int | None:
  """The duration `name` in steps, from whichever of <name>_steps/_epochs/_examples is set (None: none is;
  `config_checks` has made sure at most one is, and positive)."""
  given = {unit: config.get(f'{name}_{unit}') for unit in ('steps', 'epochs', 'examples')}
  unit, value = next(((u, v) for u, v in given.items() if v is not None), (None, None))
  if unit in (None, 'steps'):
    return value
  if unit == 'epochs':
    if num_examples is None:
      raise ValueError(f'{name}_epochs needs the size of the training split; give {name}_steps instead')
    value = value * num_examples
  return max(1, math.ceil(value / batch_size))


class Durations(NamedTuple):
  """The run's durations in steps (None: not set)."""
  total: int
  warmup: int | None
  decay: int | None
  log_every: int
  checkpoint_every: int
  eval_every: int | None
  steps_per_epoch: float | None


def durations(config, num_examples: int | None) -> Durations:
  """Every duration of `config` in steps, for a training split of `num_examples`."""
  batch_size = config.input.batch_size
  steps = lambda cfg, name: resolve_steps(cfg, name, num_examples=num_examples, batch_size=batch_size)
  return Durations(total=steps(config, 'total'), warmup=steps(config.schedule, 'warmup'),
                   decay=steps(config.schedule, 'decay'), log_every=steps(config, 'log_every'),
                   checkpoint_every=steps(config, 'checkpoint_every'), eval_every=steps(config, 'eval_every'),
                   steps_per_epoch=num_examples / batch_size if num_examples else None)


def model_options(config) -> dict:
  return {k: v for k, v in config.model.to_dict().items() if k != 'name'}


def build_model(config, *, platform: str | None = None, **overrides) -> nn.Module:
  """The config's model; `platform` ('cpu', 'gpu', 'tpu') is the hardware it will run on (default: JAX's)."""
  return models.create(config.model.name, num_classes=config.num_classes, platform=platform,
                       **{**model_options(config), **overrides})


def _path_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(model, tx, mesh, rules):
  """(abstract TrainState, TrainState of NamedShardings): parameters by their logical axes and the rules,
  optimizer-state leaves like the parameter they belong to, everything else replicated."""
  abstract = models.abstract_variables(model)
  param_sh = sharding.tree_shardings(models.logical_axes(model)['params'], abstract['params'], mesh, rules)
  by_path = {_path_keys(p): (x.shape, s) for (p, s), x in zip(jax.tree_util.tree_flatten_with_path(param_sh)[0],
                                                               jax.tree.leaves(abstract['params']))}

  def like_its_parameter(path, x):
    # An optimizer-state leaf's path ends with its parameter's (optax nests it under labels such as
    # multi_transform's 'train'): the longest such suffix with the parameter's shape.
    keys = _path_keys(path)
    for i in range(len(keys)):
      shape, spec = by_path.get(keys[i:], (None, None))
      if shape == x.shape:
        return spec
    return sharding.replicated(mesh)

  opt_shapes = jax.eval_shape(tx.init, abstract['params'])
  opt_sh = jax.tree_util.tree_map_with_path(like_its_parameter, opt_shapes)
  rep = sharding.replicated(mesh)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract['params'], opt_state=opt_shapes,
                      batch_stats=abstract.get('batch_stats', {}), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                         batch_stats=jax.tree.map(lambda _: rep, shapes.batch_stats), rng=rep)
  return shapes, shardings


def init_state(model, tx, config, rng, shardings) -> TrainState:
  """The initial state, created directly in its shardings (never whole on one device)."""
  def init(rng):
    init_rng, loop_rng = jax.random.split(rng)
    variables = models.init_variables(model, init_rng)
    params = variables['params']
    if config.init_head_bias is not None:
      params['head']['bias'] = jnp.full_like(params['head']['bias'], config.init_head_bias)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=variables.get('batch_stats', {}), rng=loop_rng)
  return jax.jit(init, out_shardings=shardings)(rng)


def _forward(model, params, batch_stats, images, rng, train: bool):
  """(logits, out, new batch_stats): BatchNorm layers update them when training, other models keep them `{}`."""
  (logits, out), updated = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=train,
                                       rngs={'dropout': rng} if train else None, mutable=['batch_stats'])
  return logits, out, updated['batch_stats']


def make_train_step(model, tx, lr_fn, config, mesh, shardings):
  loss_of = losses.loss_fn(config.loss)
  accum = config.accum_steps
  batch_sh = sharding.batch_sharding(mesh)
  micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

  def loss_and_grads(params, batch_stats, images, labels, rng):
    def compute(params):
      logits, _, new_stats = _forward(model, params, batch_stats, images, rng, train=True)
      return jnp.mean(loss_of(logits, labels)), (logits, new_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(compute, has_aux=True)(params)
    # against the dominant label: smoothed and mixed labels are positive for several classes
    correct = jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
    return loss, correct, new_stats, grads

  mix_layout = mixup.pairing(config.mixup.group_size, config.input.batch_size // sharding.data_parallel_size(mesh))

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    mix_rng, dropout_rng = jax.random.split(rng)
    labels = losses.smooth_labels(batch['labels'], config.label_smoothing)
    images, labels = mixup.mix(mix_rng, batch['image'], labels, **config.mixup.to_dict(), layout=mix_layout)
    if config.random_erasing.prob > 0:  # after mixup, as timm's loader; off: nothing traced, the keys unchanged
      # split(rng, 3)[2] is independent of mix_rng and dropout_rng under either threefry mode (fold_in(rng, 1)
      # would be dropout_rng itself under the default partitionable one)
      images = mixup.random_erasing(jax.random.split(rng, 3)[2], images, **config.random_erasing.to_dict())
    if accum == 1:
      loss, correct, batch_stats, grads = loss_and_grads(state.params, state.batch_stats, images, labels,
                                                         dropout_rng)
    else:
      # Micro-batch i takes examples i, i+accum, ...: each device keeps working on its own shard.
      split = lambda x: jax.lax.with_sharding_constraint(
          jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), micro_sh)

      def micro_step(carry, inputs):
        grad_sum, loss_sum, correct_sum, batch_stats = carry
        i, micro_images, micro_labels = inputs
        loss, correct, batch_stats, grads = loss_and_grads(
            state.params, batch_stats, micro_images, micro_labels, jax.random.fold_in(dropout_rng, i))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, correct_sum + correct, batch_stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, correct, batch_stats), _ = jax.lax.scan(
          micro_step, (zeros, 0.0, 0.0, state.batch_stats), (jnp.arange(accum), split(images), split(labels)))
      grads, loss = jax.tree.map(lambda g: g / accum, grads), loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=lr_fn(state.step), accuracy=correct / images.shape[0])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(shardings, {'image': batch_sh, 'labels': batch_sh}),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def predict(model, variables, images):
  """(logits, out) in inference mode: the evaluators' `predict_fn` (mixer_jax/evaluators/__init__.py)."""
  return _forward(model, variables['params'], variables['batch_stats'], images, None, train=False)[:2]


def model_variables(state: TrainState) -> dict:
  """The model's variables of a train state (or of its shapes or shardings): what `model.apply` takes."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


class Run(NamedTuple):
  """What a run builds from its config and mesh before it touches data or device memory."""
  model: nn.Module
  tx: optax.GradientTransformation
  shapes: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  predict_fn: Any  # (variables, images) -> (logits, out): the evaluators' (one object, so they share steps)
  eval_step: Any  # the classification evaluator's jitted step (evaluators/classification.py), for aot and bench


def count_classes(config) -> None:
  """Sets a `num_classes` the config leaves to the data (None: an image folder's class folders, configs/finetune.py)
  from the training dataset; the recipe's pp strings name it by reference (configs/common.labels) and follow."""
  if config.num_classes is None:
    config.num_classes = data.num_classes(config.input.dataset, config.input.data_dir)


def resolve_paths(config) -> None:
  """Makes the config's paths (init, data_dir, image folders, of the input and of every evaluation) absolute, so
  that config.json names the same files from any directory (`paths.resolve`)."""
  config.init = config.init if convert.files.is_remote(config.init) else paths.resolve(config.init)
  for group in (config.input, *config.evals.values()):
    for key, resolve in (('data_dir', paths.resolve), ('dataset', data.sources.resolve)):
      if group.get(key) is not None:
        group[key] = resolve(group[key])


def load_init(config) -> tuple[Any, dict]:
  """(variables, model overrides) of the `config.init` checkpoint, adapted to the fine-tuned model: the overrides
  are the options the checkpoint decides (a Mixer's tokens_mlp_dim), see `convert.load_for_finetuning`."""
  variables, overrides, notes = convert.load_for_finetuning(
      config.init, config.model.name, model_options(config), image_size=config.model.image_size,
      resize_method=config.init_resize)
  for note in notes:
    logging.info('init: %s', note)
  return variables, overrides


def build(config, mesh, *, total_steps: int, warmup_steps: int, decay_steps: int | None = None,
          steps_per_epoch: float | None = None, init_overrides: dict | None = None) -> Run:
  """The model, optimizer, state layout and jitted steps of `config` over `mesh`: what `train_and_evaluate` runs
  and `mixer_jax.aot` compiles for other hardware. `init_overrides` are the model options `config.init` decides
  (`load_init`); None reads them from `config.init`."""
  if config.init and init_overrides is None:
    _, init_overrides = load_init(config)
  model = build_model(config, platform=mesh.devices.flat[0].platform, **(init_overrides or {}))
  tx, lr_fn = optim.make(config, models.abstract_variables(model)['params'], total_steps=total_steps,
                         warmup_steps=warmup_steps, decay_steps=decay_steps, steps_per_epoch=steps_per_epoch)
  shapes, shardings = state_shardings(model, tx, mesh, config.sharding_rules)
  predict_fn = functools.partial(predict, model)
  eval_step = classification.make_step(predict_fn, config.loss, mesh, model_variables(shardings))
  return Run(model, tx, shapes, shardings, make_train_step(model, tx, lr_fn, config, mesh, shardings), predict_fn,
             eval_step)


def preflight(config, mesh, shapes, shardings, total_steps: int) -> str:
  """The run's layout as a report; raises if processes disagree on it (checked with one small all-gather, before
  the first collective that mismatched processes would hang in)."""
  params = models.count_params(shapes.params)
  facts = {'global batch': config.input.batch_size, 'devices': mesh.devices.size, 'total steps': total_steps,
           'parameters': params, 'seed': config.seed, **{f'mesh {a}': n for a, n in mesh.shape.items()}}
  if jax.process_count() > 1:
    everyone = multihost_utils.process_allgather(np.array(list(facts.values()), np.int64))
    differ = [f'{name} ' + ', '.join(f'{v} (process {p})' for p, v in enumerate(everyone[:, i]))
              for i, name in enumerate(facts) if (everyone[:, i] != everyone[0, i]).any()]
    if differ:
      raise ValueError(f'processes disagree on {"; ".join(differ)}: start every process with the same config')
  per_device = sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
  local = jax.local_devices()
  local_batch = config.input.batch_size // jax.process_count()
  return '\n'.join([
      f'process {jax.process_index()} of {jax.process_count()}; {len(local)} local {local[0].device_kind} '
      f'device(s) of {jax.device_count()}',
      f'mesh {dict(mesh.shape)} over {mesh.devices.size} devices',
      f'batch {config.input.batch_size} global, {local_batch} per process, '
      f'{config.input.batch_size // sharding.data_parallel_size(mesh)} per data-parallel device',
      f'model {models.describe(config.model.name, model_options(config))}: {params:,} parameters; train state '
      f'{per_device / 2**30:.3f} GiB per device as sharded',
  ])


def _first_non_finite(history: list[tuple[int, dict]]) -> str | None:
  for step, metrics in history:
    for name in ('loss', 'grad_norm', 'param_norm'):
      if not math.isfinite(float(metrics[name])):
        return f'{name} became {float(metrics[name])} at step {step}'
  return None


def compiled_memory(compiled) -> dict[str, float]:
  """GiB per device that a compiled step holds (XLA's memory analysis; {} where the backend gives none):
  arguments, outputs, the outputs aliased to donated arguments, temporaries, and the whole step (arguments +
  outputs - aliased + temporaries)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  gib = lambda n: n / 2**30
  return dict(arguments_gib=gib(m.argument_size_in_bytes), outputs_gib=gib(m.output_size_in_bytes),
              aliased_gib=gib(m.alias_size_in_bytes), temporaries_gib=gib(m.temp_size_in_bytes),
              step_gib=gib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                           + m.temp_size_in_bytes))


def memory_usage(compiled) -> dict[str, float]:
  """`compiled_memory` and the device's peak, or on a CPU the host process's peak resident memory."""
  out = compiled_memory(compiled)
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_gib'] = stats['peak_bytes_in_use'] / 2**30
  else:
    out['host_peak_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return out


def _memory_report(compiled) -> str:
  m = memory_usage(compiled)
  parts = []
  if 'step_gib' in m:
    parts.append(f'step arguments {m["arguments_gib"]:.2f} GiB, temporaries {m["temporaries_gib"]:.2f} GiB per device')
  parts.append(f'device peak {m["device_peak_gib"]:.2f} GiB' if 'device_peak_gib' in m
               else f'host peak RSS {m["host_peak_gib"]:.2f} GiB')
  return '; '.join(parts)


class _JsonlWriter(metric_writers.MetricWriter):
  """metrics.jsonl in the workdir, a clu MetricWriter of scalars: one JSON object per step written, as one run even
  after restarts: opening it for a run that starts at `start_step` first drops what an interrupted run logged after
  the checkpoint it resumes from. Keeps the rows of steps before `start_step`, and those at `start_step` the run will
  not write again: its train row (logged before the save), and evaluations unless they repeat (a finished run
  evaluates once more)."""

  def __init__(self, path: str, *, start_step: int, evaluations_repeat: bool):
    file = paths.at(path)
    lines = file.read_text().splitlines(keepends=True) if file.exists() else []
    rows = [(line, _row(line)) for line in lines if line.strip()]
    self._log = paths.Log(path, ''.join(line for line, row in rows
                                        if row and _kept(row, start_step, evaluations_repeat)))

  def write_scalars(self, step: int, scalars) -> None:
    self._log.write(json.dumps({'step': step, **scalars}) + '\n')

  def _not_scalars(self, *args, **kwargs) -> None:
    """metrics.jsonl holds scalars only: the TensorBoard writer beside it takes everything else."""

  write_summaries = write_images = write_videos = write_audios = write_texts = write_histograms = _not_scalars
  write_hparams = _not_scalars

  def flush(self) -> None:
    """Every line is stored as it is written."""

  def close(self) -> None:
    self._log.close()


class _FailuresNamed:
  """The run's metric writer, whose failures (a workdir whose storage stopped answering: gcsfs for metrics.jsonl,
  TensorFlow's GCS client for TensorBoard, re-raised by clu on the next write) end the run with one line naming the
  checkpoint a restart resumes from."""

  def __init__(self, writer: metric_writers.MetricWriter, ckpt: checkpoint.Checkpointer):
    self._writer, self._ckpt = writer, ckpt

  def write_scalars(self, step: int, scalars) -> None:
    self._call(self._writer.write_scalars, step, scalars)

  def close(self) -> None:
    self._call(self._writer.close)

  def _call(self, method, *args) -> None:
    try:
      method(*args)
    except Exception as error:
      raise self._ckpt.write_failed('metrics', error) from error


def _row(line: str) -> dict | None:
  """A metrics.jsonl row; None for a line torn by a kill in mid-write (it held nothing whole)."""
  try:
    row = json.loads(line)
  except ValueError:
    logging.warning('metrics.jsonl: dropping a torn line (%d characters) left by an interrupted run', len(line))
    return None
  return row if isinstance(row, dict) and isinstance(row.get('step'), int) else None


def _kept(row: dict, step: int, evaluations_repeat: bool) -> bool:
  if row['step'] != step:
    return row['step'] < step
  return any(k.startswith('train/') for k in row) or not evaluations_repeat


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir`; a path that cannot be one (a file, an unwritable place, a bucket that does not exist or does
  not answer) is a one-line error now, not after the data are read and the step compiled."""
  paths.configure_clients()
  if paths.is_url(workdir):
    paths.check_writable(workdir, '--workdir')
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file: give a directory (it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise ValueError(f'--workdir {workdir} cannot be created ({error.strerror}): give a writable directory') from None
  cli.check_output_file(os.path.join(workdir, 'metrics.jsonl'), '--workdir')


def profile_steps(config, total_steps: int) -> range:
  """The train steps `config.profile` traces (empty when `first_step` is None)."""
  first, count = config.profile.first_step, config.profile.num_steps
  if first is None:
    return range(0)
  if first < 0 or count < 1 or first + count > total_steps:
    raise ValueError(f'profile: first_step {first} and num_steps {count} must trace steps inside the run\'s '
                     f'0..{total_steps - 1} (first_step >= 0, num_steps >= 1)')
  return range(first, first + count)


def _start_trace(trace_dir: str) -> str:
  """Starts tracing; returns the local folder the profiler writes to (JAX's profiler writes local files only: a
  bucket's trace goes to a temporary folder first)."""
  local = tempfile.mkdtemp(prefix='mixer_jax_profile_') if paths.is_url(trace_dir) else trace_dir
  jax.profiler.start_trace(local, create_perfetto_trace=True)
  return local


def _stop_trace(state, local: str, trace_dir: str) -> None:
  jax.block_until_ready(state)  # the trace must hold the devices' work, not just its dispatch
  jax.profiler.stop_trace()
  if local != trace_dir:
    paths.upload_tree(local, trace_dir)
    shutil.rmtree(local)
  logging.info('profile written to %s (TensorBoard on the workdir, profile tab; Perfetto: its '
               'perfetto_trace.json.gz)', paths.join(trace_dir, 'plugins', 'profile'))


def _saved_init_overrides(workdir: str) -> dict | None:
  """The model options this run's first start resolved from `config.init` (config.json; None: not recorded)."""
  try:
    saved = json.loads(paths.at(paths.join(workdir, convert.RUN_CONFIG)).read_text()).get('init_overrides')
  except (OSError, ValueError, AttributeError):  # missing, torn, or not a JSON object
    return None
  return saved if isinstance(saved, dict) else None


def write_config(workdir: str, config, init_overrides: dict | None) -> None:
  """config.json: the run's config and, for a fine-tuning run, `init_overrides`, the model options its `init`
  checkpoint decided, which a resumed run builds its model with instead of reading the checkpoint again. Written
  whole: another process may be reading it."""
  record = json.loads(config.to_json_best_effort())
  if config.init:
    record['init_overrides'] = init_overrides
  paths.write_whole(paths.join(workdir, convert.RUN_CONFIG), json.dumps(record, indent=2))


def evaluate(evals: dict, state: TrainState, step: int, writer) -> dict[str, float]:
  """Runs every evaluator (mixer_jax/evaluators/__init__.py) on the state's variables and logs and writes each
  one's metrics as `<name>/<metric>`; returns them all."""
  variables = model_variables(state)
  written = {}
  for name, evaluator in evals.items():
    t0 = time.time()
    metrics = dict(evaluator.run(variables))
    logging.info('eval %s at step %d: %s (%.1fs)', name, step, evaluator.summary(metrics), time.time() - t0)
    metrics = {f'{name}/{k}': v for k, v in metrics.items()}
    writer.write_scalars(step, metrics)
    written.update(metrics)
  return written


def train_and_evaluate(config, workdir: str, *, devices=None, parameter_table: bool = False) -> dict[str, float]:
  """Trains (resuming from the newest checkpoint in `workdir` if there is one) and returns the last metrics;
  `parameter_table` logs every parameter at the start (the pre-flight report counts them)."""
  # --- Config, workdir -----------------------------------------------------------------------------------
  workdir = paths.resolve(workdir)
  resolve_paths(config)
  count_classes(config)
  config_checks.check(config)
  prepare_workdir(workdir)
  primary = jax.process_index() == 0

  # --- Mesh ----------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape, devices=devices)
  num_devices = mesh.devices.size
  batch_size = config.input.batch_size
  sharding.check_batch_size(batch_size, mesh, accum_steps=config.accum_steps)

  # --- Durations, in steps of the training split -------------------------------------------------------------
  steps = durations(config, data.num_examples(config.input.dataset, config.input.split,
                                              data_dir=config.input.data_dir))
  traced = profile_steps(config, steps.total)

  # --- Model, optimizer, train state ---------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                 keep_every_steps=config.checkpoint.keep_every_steps,
                                 async_save=config.checkpoint.async_save)
  # A fine-tuning run reads config.init at its first start only; a resumed one builds the model with what that
  # start recorded in config.json.
  init_variables, init_overrides = None, None
  if config.init and ckpt.latest_step() is not None:
    init_overrides = _saved_init_overrides(workdir)
  if config.init and init_overrides is None:
    init_variables, init_overrides = load_init(config)
  if primary:
    write_config(workdir, config, init_overrides)
  run = build(config, mesh, total_steps=steps.total, warmup_steps=steps.warmup, decay_steps=steps.decay,
              steps_per_epoch=steps.steps_per_epoch, init_overrides=init_overrides or {})
  shapes, shardings = run.shapes, run.shardings
  logging.info('pre-flight:\n%s', preflight(config, mesh, shapes, shardings, steps.total))
  # The newest checkpoint that restores whole; damaged ones are moved aside (checkpoint.py).
  state = ckpt.restore_newest(checkpoint.abstract_like(shapes, shardings))
  if state is not None:
    logging.info('resumed from %s at step %d', ckpt.directory, int(state.step))
  else:
    state = init_state(run.model, run.tx, config, jax.random.PRNGKey(config.seed), shardings)
    if config.init:  # merged against the shapes: no process needs the fresh arrays (sharded, maybe elsewhere)
      variables, report = convert.merge(init_variables, models.abstract_variables(models.per_block(run.model)),
                                        keep_head=config.init_keep_head)
      logging.info('init from %s: %s', config.init, report)
      variables = models.stack_blocks(variables, run.model)  # the state's own layout
      state = state.replace(params=jax.device_put(variables['params'], shardings.params),
                            batch_stats=jax.device_put(variables.get('batch_stats', {}), shardings.batch_stats))
  start_step = int(state.step)
  if primary and parameter_table:
    overview = parameter_overview.get_parameter_overview(shapes.params, include_stats=False)
    logging.info('parameters of %s:\n%s', config.model.name, overview)

  # --- Metrics: logs on every process, TensorBoard and metrics.jsonl on process 0 ----------------------------
  writers = [metric_writers.create_default_writer(workdir, just_logging=not primary)]
  if primary:
    writers.append(_JsonlWriter(paths.join(workdir, 'metrics.jsonl'), start_step=start_step,
                                evaluations_repeat=start_step >= steps.total))
  writer = _FailuresNamed(metric_writers.MultiWriter(writers), ckpt)

  # --- Input ---------------------------------------------------------------------------------------------
  train_iter = data.train_iter(
      config.input.dataset, config.input.split, pp=config.input.pp, global_batch_size=batch_size,
      seed=config.seed, start_step=start_step, data_dir=config.input.data_dir,
      shuffle_buffer=config.input.shuffle_buffer, cache=config.input.cache, prefetch=config.input.prefetch,
      split_per_process=config.input.split_per_process)

  # --- Evaluators: config.evals, each with its own data; entries of one kind share their jitted step ----------
  evals = evaluators.from_config(
      config.evals, run.predict_fn, mesh, variables_shardings=model_variables(shardings),
      defaults=dict(dataset=config.input.dataset, data_dir=config.input.data_dir, batch_size=batch_size,
                    loss=config.loss))

  # --- Compile the train step on the first batch -----------------------------------------------------------
  preempted = checkpoint.Preemption()  # from here on, SIGTERM saves at the next step
  if start_step < steps.total:
    batch = sharding.global_batch(next(train_iter), mesh)
    t0 = time.time()
    compiled = run.train_step.lower(state, batch).compile()
    logging.info('compiled the train step in %.1fs; %s', time.time() - t0, _memory_report(compiled))

  # --- Train loop ----------------------------------------------------------------------------------------
  # Throughput windows run from one log step to the next, without compilation and evaluations.
  history, last_log, last_metrics, stopped = [], (start_step, time.time()), {}, False
  tracing, trace_dir = None, paths.join(workdir, 'profile', f'process_{jax.process_index()}')
  for step in range(start_step, steps.total):
    if step > start_step:  # the first step's batch is the one compiled on
      batch = sharding.global_batch(next(train_iter), mesh)
    if traced and step == traced.start:
      tracing = _start_trace(trace_dir)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = compiled(state, batch)
    if tracing and step + 1 == traced.stop:
      _stop_trace(state, tracing, trace_dir)
      tracing = None
    history.append((step + 1, metrics))
    done = step + 1
    if done % steps.log_every == 0 or done == steps.total:
      history = jax.device_get(history)
      bad = _first_non_finite(history)
      if bad:
        raise FloatingPointError(f'training diverged: {bad}; lower lr, enable grad_clip_norm, or check the data')
      elapsed = time.time() - last_log[1]
      images_per_s = (done - last_log[0]) * batch_size / max(elapsed, 1e-9)
      eta = (steps.total - done) * elapsed / max(done - last_log[0], 1)
      scalars = {k: float(v) for k, v in history[-1][1].items()}
      scalars.update(images_per_s=images_per_s, images_per_s_per_device=images_per_s / num_devices)
      logging.info('step %d/%d loss %.4f acc %.3f lr %.3g | %.0f img/s, %.1f img/s/device | ETA %s', done,
                   steps.total, scalars['loss'], scalars['accuracy'], scalars['lr'], images_per_s,
                   images_per_s / num_devices, time.strftime('%H:%M:%S', time.gmtime(eta)))
      scalars = {f'train/{k}': v for k, v in scalars.items()}
      writer.write_scalars(done, scalars)
      last_metrics.update(scalars)
      history, last_log = [], (done, time.time())
    stopped = preempted(done)
    if done % steps.checkpoint_every == 0 or done == steps.total or stopped:
      ckpt.save(done, state)
    if stopped:
      logging.info('preempted: saved step %d, exiting', done)
      break
    if steps.eval_every and done % steps.eval_every == 0 and done < steps.total:
      t0 = time.time()
      last_metrics.update(evaluate(evals, state, done, writer))
      last_log = (last_log[0], last_log[1] + time.time() - t0)
  if tracing:  # preempted inside the traced steps
    _stop_trace(state, tracing, trace_dir)

  # --- Final evaluation (also when the run had already finished; a preempted run evaluates when it does) ------
  if not stopped:
    last_metrics.update(evaluate(evals, state, int(state.step), writer))
  ckpt.wait()
  ckpt.close()
  writer.close()
  return {**last_metrics, 'step': int(state.step), 'preempted': int(state.step) < steps.total}
