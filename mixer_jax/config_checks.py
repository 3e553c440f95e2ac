"""A training config checked whole before anything runs: every field the trainer reads, against what it accepts,
with the field in the message.

A bad value then costs a second instead of a dataset read and a compile, and a value that would train wrongly (a
negative learning rate, `total_epochs=-1`, which used to run one step and exit 0) never trains. `check(config)`
raises a one-line ValueError `config.<field> = <value>: must be <what it accepts>`; what depends on the mesh
(batch sizes against the data-parallel devices) is checked where the mesh exists (`sharding.check_batch_size`).

Must not: hold defaults (configs/common.py does) or restate what an owner decides: the losses, optimizers,
schedules, models, dtypes and cache modes come from their modules.
"""
import math
import os
import re

from mixer_jax import cli, data, losses, mixup, models, optim, paths
from mixer_jax.convert import files, pretrained, resize

# (name, required): the durations of configs/common.py, each given as exactly one of _steps/_epochs/_examples.
DURATIONS = (('total', True), ('log_every', True), ('checkpoint_every', True), ('eval_every', False))
EVAL_TYPES = ('classification', 'fewshot')
CLASSIFICATION_FIELDS = ('type', 'split', 'pp', 'dataset', 'data_dir', 'batch_size')  # evaluators/classification.py


def _integer(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regexes(v) -> bool:
  try:
    return isinstance(v, (tuple, list)) and all(isinstance(r, str) and re.compile(r) for r in v)
  except re.error:
    return False


def _lr_mults(v) -> bool:
  return isinstance(v, (tuple, list)) and all(isinstance(r, (tuple, list)) and len(r) == 2 and _regexes(r[:1])
                                                and _number(r[1]) and r[1] >= 0 for r in v)


def _int_from(low: int):
  return lambda v: _integer(v) and v >= low


def _number_in(low: float, high: float = math.inf, *, open_high: bool = False):
  return lambda v: _number(v) and low <= v and (v < high if open_high else v <= high)


def _one_of(choices):
  return lambda v: v in choices


# (field, accepts, what it must be). A requirement starting "None or" lets None pass.
RULES = (
    ('seed', _integer, 'an integer'),
    ('num_classes', _int_from(1), 'an integer >= 1'),
    ('input.batch_size', _int_from(1), 'an integer >= 1'),
    ('input.shuffle_buffer', _int_from(1), 'an integer >= 1'),
    ('input.prefetch', _int_from(0), 'an integer >= 0'),
    ('input.cache', _one_of(data.pipeline.CACHE_MODES), f'one of {data.pipeline.CACHE_MODES}'),
    ('accum_steps', _int_from(1), 'an integer >= 1'),
    ('loss', _one_of(losses.LOSSES), f'one of {tuple(losses.LOSSES)}'),
    ('label_smoothing', _number_in(0, 1, open_high=True), 'a number in [0, 1)'),
    ('mixup.mixup_alpha', _number_in(0), 'a number >= 0 (0: off)'),
    ('mixup.cutmix_alpha', _number_in(0), 'a number >= 0 (0: off)'),
    ('mixup.prob', _number_in(0, 1), 'a probability in [0, 1]'),
    ('mixup.switch_prob', _number_in(0, 1), 'a probability in [0, 1]'),
    ('mixup.group_size', _int_from(1), 'None or an integer >= 1 (None: the whole batch)'),
    ('random_erasing.prob', _number_in(0, 1), 'a probability in [0, 1] (0: off)'),
    ('random_erasing.mode', _one_of(mixup.ERASE_MODES), f'one of {mixup.ERASE_MODES}'),
    ('random_erasing.area_min', lambda v: _number(v) and 0 < v <= 1, 'a fraction of the image in (0, 1]'),
    ('random_erasing.area_max', lambda v: _number(v) and 0 < v <= 1, 'a fraction of the image in (0, 1]'),
    ('random_erasing.ratio_min', lambda v: _number(v) and v > 0, 'an aspect ratio > 0'),
    ('random_erasing.ratio_max', lambda v: _number(v) and v > 0, 'an aspect ratio > 0'),
    ('optimizer', _one_of(optim.OPTIMIZERS), f'one of {optim.OPTIMIZERS}'),
    ('lr', _number_in(0), 'a number >= 0 (a negative learning rate climbs the loss)'),
    ('schedule.type', _one_of(optim.SCHEDULES), f'one of {optim.SCHEDULES}'),
    ('schedule.warmup_init', _number_in(0), 'a number >= 0 (a fraction of lr)'),
    ('schedule.end', _number_in(0), 'a number >= 0 (a fraction of lr)'),
    ('schedule.per_epoch', lambda v: isinstance(v, bool), 'True or False'),
    ('schedule.warmup_prefix', lambda v: isinstance(v, bool), 'True or False'),
    ('weight_decay', _number_in(0), 'a number >= 0'),
    ('weight_decay_style', _one_of(optim.WEIGHT_DECAY_STYLES), f'one of {optim.WEIGHT_DECAY_STYLES}'),
    ('wd_mask', _regexes, 'a tuple of regexes'),
    ('frozen', _regexes, 'a tuple of regexes'),
    ('lr_mults', _lr_mults, 'a tuple of (regex, multiplier >= 0) pairs'),
    ('grad_clip_norm', lambda v: _number(v) and v > 0, 'None or a number > 0'),
    ('init', lambda v: isinstance(v, str), "a checkpoint file or workdir, or '' to train from scratch"),
    ('init_keep_head', lambda v: isinstance(v, bool), 'True or False'),
    ('init_resize', _one_of(resize.METHODS), f'one of {resize.METHODS}'),
    ('model.dtype', _one_of(models.DTYPES), f'one of {models.DTYPES}'),
    ('checkpoint.keep', _int_from(1),
     'an integer >= 1 (the newest checkpoint is never deleted; keep more with checkpoint.keep_every_steps)'),
    ('checkpoint.keep_every_steps', _int_from(1), 'None or an integer >= 1'),
    ('checkpoint.async_save', lambda v: isinstance(v, bool), 'True or False'),
    ('profile.first_step', _int_from(0), 'None or an integer >= 0'),
    ('profile.num_steps', _int_from(1), 'an integer >= 1'),
)


def _get(config, path: str):
  for part in path.split('.'):
    if part not in config:
      raise ValueError(f'config has no field {path!r}: build configs on configs/common.py base_config()')
    config = config[part]
  return config


def _refuse(path: str, value, must: str):
  raise ValueError(f'config.{path} = {value!r}: must be {must}')


def _check_duration(config, prefix: str, name: str, *, required: bool, zero: bool = False) -> None:
  """`<name>_steps`, `_epochs` or `_examples`: exactly one when `required`, at most one otherwise, > 0 (>= 0 with
  `zero`: a warmup may be none)."""
  given = {u: config.get(f'{name}_{u}') for u in ('steps', 'epochs', 'examples')}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) > 1 or (required and not given):
    listed = ', '.join(f'{prefix}{name}_{u} = {v!r}' for u, v in given.items()) or 'none'
    raise ValueError(f'config.{prefix}{name}: set exactly one of {prefix}{name}_steps, {prefix}{name}_epochs or '
                     f'{prefix}{name}_examples (set: {listed})')
  for unit, value in given.items():
    kind, what = (_number, 'a number') if unit == 'epochs' else (_integer, 'an integer')
    if not (kind(value) and (value >= 0 if zero else value > 0)):
      _refuse(f'{prefix}{name}_{unit}', value, f'{what} {">= 0" if zero else "> 0"}')


def _check_evals(evals) -> None:
  if 'train' in evals:
    raise ValueError("config.evals.train: the name 'train' is reserved for training metrics; call it e.g. "
                     "'train_eval'")
  for name, cfg in evals.items():
    kind = cfg.get('type', 'classification')
    if kind not in EVAL_TYPES:
      _refuse(f'evals.{name}.type', kind, f'one of {EVAL_TYPES}')
    if kind == 'classification':
      unknown = sorted(set(cfg) - set(CLASSIFICATION_FIELDS))
      if unknown:
        hint = cli.did_you_mean(unknown[0], CLASSIFICATION_FIELDS)
        raise ValueError(f'config.evals.{name}: unknown field(s) {", ".join(unknown)}{hint}; a classification '
                         f'evaluation takes {", ".join(CLASSIFICATION_FIELDS)}')
      for key in ('split', 'pp'):
        if not isinstance(cfg.get(key), str):
          _refuse(f'evals.{name}.{key}', cfg.get(key), 'a string (the evaluation reads it)')
      if cfg.get('batch_size') is not None and not (_integer(cfg.batch_size) and cfg.batch_size >= 1):
        _refuse(f'evals.{name}.batch_size', cfg.batch_size, 'None (the training batch) or an integer >= 1')


def _check_mesh(mesh) -> None:
  shape = mesh.shape
  if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(_integer(s) and (s >= 1 or s == -1)
                                                                       for s in shape) and list(shape).count(-1) <= 1):
    _refuse('mesh.shape', shape, "3 sizes for ('data', 'fsdp', 'model'), each >= 1 or one of them -1")
  dcn = mesh.get('dcn_shape')
  if dcn is not None and not (isinstance(dcn, (tuple, list)) and len(dcn) == 3 and all(
      _integer(s) and s >= 1 for s in dcn)):
    _refuse('mesh.dcn_shape', dcn, 'None or 3 slice counts >= 1')


def check(config) -> None:
  """Raises a one-line ValueError naming the first field of `config` the trainer would not accept."""
  for path, accepts, must in RULES:
    value = _get(config, path)
    if not (value is None and must.startswith('None or')) and not accepts(value):
      _refuse(path, value, must)
  group, batch = config.mixup.group_size, config.input.batch_size
  if group is not None and batch % group:
    _refuse('mixup.group_size', group, f'a divisor of input.batch_size {batch}: change one of them (timm: the '
            'per-GPU batch, which divides the global one)')
  # BatchNorm sees one micro-batch at a time (an accum_steps that does not divide the batch is refused later,
  # against the devices)
  bn_group, micro_batch = config.model.get('bn_group_size'), batch // config.accum_steps
  if bn_group is not None and not (_integer(bn_group) and bn_group >= 1 and micro_batch % bn_group == 0):
    _refuse('model.bn_group_size', bn_group, f'None or an integer >= 1 dividing the {micro_batch} examples of each '
            f'micro-batch (input.batch_size {batch} / accum_steps {config.accum_steps}): change one of them')
  erasing = config.random_erasing
  for low, high in (('area_min', 'area_max'), ('ratio_min', 'ratio_max')):
    if erasing[low] > erasing[high]:
      _refuse(f'random_erasing.{low}', erasing[low], f'<= random_erasing.{high} = {erasing[high]!r}')
  for name, required in DURATIONS:
    _check_duration(config, '', name, required=required)
  _check_duration(config.schedule, 'schedule.', 'warmup', required=True, zero=True)
  _check_duration(config.schedule, 'schedule.', 'decay', required=False)
  if config.schedule.type == 'onecycle' and config.schedule.per_epoch:
    _refuse('schedule.per_epoch', True, "False with schedule.type 'onecycle' (timm steps it per iteration)")
  decay_in_steps = config.schedule.decay_epochs is None and config.schedule.decay_examples is None
  if config.total_steps is not None and config.schedule.warmup_steps is not None and decay_in_steps:
    try:  # else known after the data
      optim.schedule_fn(config.schedule.type, total_steps=config.total_steps,
                        warmup_steps=config.schedule.warmup_steps, decay_steps=config.schedule.decay_steps)
    except ValueError as error:
      raise ValueError(f'config.schedule: {error}') from None
  if config.init and not files.is_remote(config.init) and not os.path.exists(paths.resolve(config.init)):
    hint = pretrained.download_hint(config.init) or ": give one, or '' to train from scratch"
    raise ValueError(f'config.init = {config.init!r}: no such checkpoint file or workdir{hint}')
  _check_mesh(config.mesh)
  _check_evals(config.evals)
  name = config.model.name
  if name not in models.names():
    raise ValueError(f'config.model.name = {name!r}: unknown model{cli.did_you_mean(name, models.names())}; known '
                     f'models: {", ".join(models.names())}')
  options = {k: v for k, v in config.model.items() if k != 'name'}
  try:
    models.create(config.model.name, num_classes=config.num_classes, **options)
  except ValueError as error:
    raise ValueError(f'config.model: {error}') from None
