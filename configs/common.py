"""Defaults shared by every experiment, the `key=value,...` argument parser and duration resolution.

Each recipe's `get_config(arg)` starts from `base_config()` and sets what it changes. The returned ConfigDict is
locked by the command line, so any field can be overridden with `--config.field=value` and a misspelt field is
an error. Fields that default to None are typed placeholders, so they can be overridden too.

Durations (`total`, `warmup`, `decay`, `log_every`, `eval_every`, `checkpoint_every`) may be given in steps, epochs or
examples: exactly one of `<name>_steps`, `<name>_epochs`, `<name>_examples` is set (the trainer converts them).

Recipes are data, as big_vision's: a recipe imports this module and ml_collections only, and writes its
pre-processing strings itself. Loading one imports neither TensorFlow nor JAX, the models or the converters
(tests/test_recipes.py), so this module states what it needs of them as data, kept equal to its source by tests.
"""
import ast

from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference, placeholder

# Logical parameter axes (mixer_jax/models/layers.py) -> mesh axes ('data', 'fsdp', 'model'). A parameter
# dimension is sharded over the mesh axes of its logical name when its size divides; otherwise it is
# replicated. With mesh (-1, 1, 1) everything is replicated (pure data parallelism); a larger `fsdp` axis shards
# parameters and optimizer state along 'embed'; a larger `model` axis splits MLP hidden units and heads.
SHARDING_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('token_mlp', 'model'),
    ('heads', 'model'),
)

DURATION_UNITS = ('steps', 'epochs', 'examples')


def _durations(config: ConfigDict, name: str, **value):
  """Adds the three typed fields of a duration, None but for the one `value` sets, e.g. steps=100. Typed, so that a
  recipe's None can be overridden (`--config.<name>_steps=...` replaces the recipe's unit, see mixer_jax/cli.py)."""
  for unit in DURATION_UNITS:
    setattr(config, f'{name}_{unit}', FieldReference(value.get(unit), float if unit == 'epochs' else int))


# The speed and memory switches of each family's models, declared in `config.model` so the command line can set
# them: `--config.model.remat=full|dots|dots_no_batch` (models/layers.py REMAT_POLICIES), `scan_blocks=True` for the
# families whose blocks are identical (models.SCANNED_BLOCKS), `depthwise=conv|shift` for those with depthwise
# convolutions ('auto': the form for the hardware, layers.depthwise_impl), DaViT's `attention_impl=xla|cudnn` (None:
# jax.nn.dot_product_attention's choice). tests/test_recipes.py checks the table against the registry
# (mixer_jax.models.options).
MODEL_SWITCHES = {
    'mixer': dict(remat='none', scan_blocks=False),
    'convmixer': dict(remat='none', scan_blocks=False, depthwise='auto'),
    'davit': dict(remat='none', depthwise='auto', attention_impl=None),
}
# How datasets name a folder of the user's images, `imagefolder:<root>` (mixer_jax/data/sources.py).
IMAGE_FOLDER = 'imagefolder:'


def family(name: str) -> str:
  """The family of a registered model name, 'mixer_b16' -> 'mixer' (mixer_jax.models.family, without the models)."""
  return name.split('_', 1)[0]


def model_config(name: str, **options) -> dict:
  """`config.model` of a recipe: the model `name`, its family's switches (MODEL_SWITCHES), and its `options`. A
  name outside the registry gets no switches: the config check then names it as unknown."""
  switches = MODEL_SWITCHES.get(family(name), {})
  # None: the model's automatic choice, overridable by a string (a fresh placeholder: each config its own)
  switches = {key: placeholder(str) if value is None else value for key, value in switches.items()}
  return dict(name=name, **switches, **options)


def labels(num_classes: int | FieldReference, key: str = 'label', smoothing: float = 0.0) -> str | FieldReference:
  """The pp tail of every recipe: `labels`, the one-hot of the `key` feature (ImageNet-ReaL's multi-hot labels are
  `real_label`) with label smoothing folded in, and only the image and labels kept. Given the reference of a
  config's `num_classes` (`config.get_ref('num_classes')`), the tail is a reference too, whose text follows the
  field: for a count only the dataset knows, which the trainer fills in (`num_classes` None).
  """
  smooth = f', label_smoothing={smoothing}' if smoothing else ''
  depth = num_classes.to_str() if isinstance(num_classes, FieldReference) else str(num_classes)
  return 'onehot(' + depth + f', key="{key}", key_result="labels"{smooth})|keep("image", "labels")'


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0

  # Model: `name` is a mixer_jax.models name; every other field is passed to models.create as an option.
  c.model = ConfigDict(dict(name='mixer_s32', dtype='float32'))
  # None: the training dataset's label classes, counted when the run starts (image folders). A reference, so that
  # pp strings can name it before it is known (`labels`).
  c.num_classes = FieldReference(1000, int)
  # A checkpoint to fine-tune from ('' trains from scratch): Google .npz, timm .safetensors/.pth, or an orbax
  # workdir. Its head is replaced by a zero head, as vit_jax does, unless init_keep_head (then only a head with
  # another number of classes starts at zero). A Mixer at another resolution gets the paper's token-mixing
  # expansion: 'blocks' (K x K parts), 'strided' (sub-grids), or the non-paper 'interpolate'.
  c.init = ''
  c.init_keep_head = False
  c.init_resize = 'blocks'

  # Training data. batch_size is global; each process reads batch_size / process_count examples.
  c.input = ConfigDict(dict(
      dataset='fashion_mnist', data_dir=placeholder(str), split='train', pp='', batch_size=256,
      shuffle_buffer=50_000, cache=placeholder(str), prefetch=2,
      # False: the same global batches on any number of processes (each reads the whole split; see data/)
      split_per_process=True))
  # Evaluations by name; each reads every example of its split exactly once. Unset fields fall back to input's.
  c.evals = ConfigDict()
  _durations(c, 'total')
  _durations(c, 'log_every', steps=50)
  _durations(c, 'eval_every')
  _durations(c, 'checkpoint_every', steps=1000)

  # Loss and regularisation.
  c.loss = 'softmax_xent'  # or 'sigmoid_xent' (big_vision's Mixer recipe)
  c.label_smoothing = 0.0
  c.init_head_bias = placeholder(float)  # e.g. -6.9 = log(1/1000) with sigmoid_xent
  # On device, in timm's loader order (mixer_jax/mixup.py). Mixup: with probability `prob`, mix the batch with its
  # reverse; cutmix instead of mixup with probability `switch_prob` when both alphas are positive; group_size: mix
  # each run of that many examples on its own, as timm's per-GPU collate (None: the whole global batch).
  c.mixup = ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                            group_size=placeholder(int)))
  # Then timm's RandomErasing on the mixed, normalised images: with probability `prob` (0: off) one box of area
  # area_min..area_max of the image and log-uniform aspect ratio_min..ratio_max, filled with N(0, 1) noise per
  # pixel ('pixel'), per channel ('rand') or zeros ('const').
  c.random_erasing = ConfigDict(dict(prob=0.0, mode='pixel', area_min=0.02, area_max=1 / 3, ratio_min=0.3,
                                     ratio_max=1 / 0.3))

  # Optimizer (mixer_jax/optim.py): clip -> adam|sgd -> lr (x lr_mults) -> weight decay -> schedule.
  c.optimizer = 'adam'
  c.optimizer_kw = ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=placeholder(str)))
  c.lr = 1e-3
  # warmup_init and end are fractions of lr. The decay reaches `end` at `decay` (unset: the run's end) and stays
  # there; per_epoch and warmup_prefix=False reproduce timm's epoch-stepped schedulers (optim.py).
  c.schedule = ConfigDict(dict(type='cosine', warmup_init=0.0, end=0.0, per_epoch=False, warmup_prefix=True))
  _durations(c.schedule, 'warmup', steps=0)
  _durations(c.schedule, 'decay')
  c.weight_decay = 0.0
  c.weight_decay_style = 'adamw'  # or 'big_vision' (see optim.py)
  c.wd_mask = ('.*/kernel$',)
  c.grad_clip_norm = placeholder(float)
  c.lr_mults = ()  # ((regex, multiplier), ...) on '/'-joined parameter names, first match wins
  c.frozen = ()  # (regex, ...): parameters that are never updated (no optimizer state either)
  c.accum_steps = 1  # micro-batches per step (memory only; BatchNorm statistics are per micro-batch)

  # Parallelism: mesh axes ('data', 'fsdp', 'model'); -1 takes the remaining devices. dcn_shape splits the
  # mesh across TPU slices (multi-slice jobs): the full mesh is shape x dcn_shape.
  c.mesh = ConfigDict(dict(shape=(-1, 1, 1), dcn_shape=placeholder(tuple)))
  c.sharding_rules = SHARDING_RULES

  c.checkpoint = ConfigDict(dict(keep=2, keep_every_steps=placeholder(int), async_save=True))
  # A jax.profiler trace of train steps first_step .. first_step + num_steps - 1 (step = updates done before it),
  # by each process into <workdir>/profile/process_<i>/plugins/profile/<time>/ (TensorBoard's profile plugin on
  # the workdir, Perfetto). None: no trace.
  c.profile = ConfigDict(dict(first_step=placeholder(int), num_steps=5))
  return c


class ArgumentsHelp(Exception):
  """What `parse_arg('help')` raises instead of parsing: the recipe's arguments and defaults, which the command line
  prints (`--config=configs/<recipe>.py:help`)."""

  def __init__(self, defaults: dict):
    super().__init__('arguments: ' + ', '.join(f'{k}={v!r}' for k, v in defaults.items()))
    self.recipe_arguments = defaults


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Parses 'key=value,key=value' into the typed `defaults`; an unknown key or a malformed pair is an error, and
  'help' lists the arguments (ArgumentsHelp)."""
  if arg is not None and arg.strip() == 'help':
    raise ArgumentsHelp(defaults)
  parsed = ConfigDict(defaults)
  for pair in filter(None, (arg or '').split(',')):
    key, sep, text = pair.partition('=')
    if not sep:
      raise ValueError(f'config argument {pair!r} is not key=value (arguments: {", ".join(defaults)})')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; arguments: {", ".join(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={text!r} is not a boolean')
      value = text.lower() in ('true', '1')
    elif isinstance(default, (int, float)):
      try:
        value = type(default)(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        raise ValueError(f'config argument {key}={text!r} is not a {type(default).__name__}') from None
    else:
      value = text
    parsed[key] = value
  return parsed


def imagenet_evals(image_pp: str, num_classes: int = 1000) -> dict:
  """big_vision's ImageNet evaluations: held-out train (minival), val, ImageNet-v2 and ImageNet-ReaL, each
  pre-processed by `image_pp` and the `labels` tail reading its label key."""
  pp = lambda key: f'{image_pp}|{labels(num_classes, key)}'
  return dict(
      minival=dict(split='train[99%:]', pp=pp('label')),
      val=dict(split='validation', pp=pp('label')),
      v2=dict(dataset='imagenet_v2', split='test', pp=pp('label')),
      real=dict(dataset='imagenet2012_real', split='validation', pp=pp('real_label')),
  )
