"""A checkpoint made ready to run: the model it holds, its variables, and the pre-processing its images need; what
eval.py and `python -m mixer_jax.predict` share.

  spec(checkpoint, model, options, entry)   (run, name, options): the model from the command line (--model,
                                            --model_options), a `--pretrained` entry, or a training workdir's
                                            config.json (its own model, with every option the run used)
  restore(checkpoint, name, options, ...)   Restored(model, variables, num_classes, resolution)
  run_evaluations(run)                      the classification evaluations a training run configured, as its
                                            trainer filled them in (dataset, split, data_dir, pp, batch_size)
  preset_pp(...)                            the pre-processing of a checkpoint that is not a training run: the
                                            `--pretrained` entry's, else the family's eval preset (data/presets.py)
  predict                                   (variables, images) -> (logits, out), what a training run evaluated with

A workdir is run as its run ran it: its evaluation pre-processing, its resolution and channels, its classes.

This module must not evaluate, train or write anything.
"""
import functools
from typing import Any, NamedTuple

from mixer_jax import convert, models, paths, trainer
from mixer_jax.data import presets

DEFAULT_BATCH_SIZE = 256


def spec(checkpoint: str, model: str | None, options: dict, entry) -> tuple[dict | None, str, dict]:
  """(the run's config.json if `checkpoint` is a training workdir of `model`, else None; the model name; its
  options): `model` and `options` first, then the `--pretrained` entry, then the workdir's config.json (whose
  options describe its own model only)."""
  run = convert.run_config(checkpoint)
  if run is not None:
    saved, saved_options = convert.run_model(run)
    if model and model != saved:
      run = None
    else:
      model, options = saved, {**saved_options, **options}
  if entry is not None:
    model = model or entry.model
    options = {**dict(entry.options), **options}
  if not model:
    raise ValueError('no model to run: give --model (or --pretrained, or a training workdir holding '
                     f'{convert.RUN_CONFIG})')
  return run, model, options


class Restored(NamedTuple):
  model: Any  # the flax module, built as the checkpoint needs
  variables: dict  # {'params': ..., 'batch_stats': ...} (numpy; {} without BatchNorm), in the model's layout
  num_classes: int
  resolution: int  # the image size the model runs at


def restore(checkpoint: str, name: str, options: dict, given: dict) -> Restored:
  """The model `name` with `options` and its variables from `checkpoint`. The checkpoint decides the head and a
  Mixer's token grid; `given` (the user's own options) may only agree with them, except `image_size`, a ConvMixer's
  or DaViT's resolution (default: the run's, else the registered variant's)."""
  architecture = {k: v for k, v in options.items() if k not in convert.CHECKPOINT_OPTIONS}
  variables = convert.load(checkpoint, name, **architecture)
  fixed = convert.tree_options(name, variables['params'])
  for key in sorted(set(given) & set(fixed) - {'image_size'}):  # the head and token MLP: allowed where they agree
    if given[key] != fixed[key]:
      raise ValueError(f'--model_options: {key}={given[key]}, but the checkpoint has {key}={fixed[key]}: leave it '
                       'out')
  resolution = (options.get('image_size') or fixed.get('image_size')
                or models.variant(name).kwargs.get('image_size', 224))
  if models.family(name) == 'mixer' and resolution != fixed['image_size']:
    raise ValueError(f'--model_options: image_size={resolution}, but {name} from {checkpoint} runs at '
                     f'{fixed["image_size"]}x{fixed["image_size"]} only; fine-tune it at another resolution with '
                     'configs/finetune.py:res=...')
  if not fixed['num_classes']:
    raise ValueError(f'{checkpoint} has no classification head: fine-tune it first (configs/finetune.py)')
  model = models.create(name, **{**options, **fixed, 'image_size': resolution})
  variables = models.stack_blocks(variables, model)  # a workdir's scan_blocks=True: its own layout
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return Restored(model, variables, fixed['num_classes'], resolution)


def predict(model):
  """(variables, images) -> (logits, out) in inference mode: the function a training run's evaluations ran, so a
  workdir evaluates to the same numbers."""
  return functools.partial(trainer.predict, model)


class Evaluation(NamedTuple):
  """One classification evaluation: a run's `config.evals` entry, or one the command line describes."""
  name: str
  dataset: str
  split: str
  data_dir: str | None
  pp: str | None  # None: `preset_pp`, once the model is known
  batch_size: int


def run_evaluations(run: dict) -> list[Evaluation]:
  """The classification entries of a run's `config.evals`, with the run's defaults filled in as its trainer did."""
  train = run.get('input') or {}
  return [Evaluation(name, entry.get('dataset') or train.get('dataset'), entry['split'],
                     paths.resolve(entry.get('data_dir') or train.get('data_dir')), entry['pp'],
                     entry.get('batch_size') or train.get('batch_size') or DEFAULT_BATCH_SIZE)
          for name, entry in (run.get('evals') or {}).items() if entry.get('type', 'classification') == 'classification']


def preset_pp(restored: Restored, name: str, entry, label_key: str = 'label') -> str:
  """The evaluation pp of a checkpoint that is not a training run: the `--pretrained` entry's image pp, else the
  family preset at the model's resolution, for the model's channels, ending in `labels` from `label_key`."""
  num_classes, model = restored.num_classes, restored.model
  labels = f'onehot({num_classes}, key="{label_key}", key_result="labels")|keep("image", "labels")'
  if entry is not None and entry.image_pp:
    pp = f'{entry.image_pp}|{labels}'
  else:
    pp = presets.eval_pp(models.family(name), resolution=restored.resolution, num_classes=num_classes,
                         label_key=label_key)
  if model.in_channels != 3:  # e.g. a grayscale quickstart model converted to .npz
    pp = pp.replace('decode|', f'decode(channels={model.in_channels})|', 1)
  return pp
