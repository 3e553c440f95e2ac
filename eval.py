"""Evaluate a checkpoint on a dataset split: top-1, top-5, loss, images/s (and ImageNet-ReaL, few-shot probes).

  python eval.py --checkpoint=Mixer-B_16.npz --model=mixer_b16 --data_dir=TFDS_DIR
  python eval.py --checkpoint=davit_tiny.safetensors --pretrained=davit_tiny.msft_in1k --data_dir=TFDS_DIR
  python eval.py --checkpoint=WORKDIR --dataset=imagenet2012_real --label_key=real_label   (ImageNet-ReaL)
  python eval.py --checkpoint=WORKDIR --dataset=fashion_mnist --split=test --fewshot=cifar100,pets --output=r.json

The checkpoint is any format mixer_jax.convert reads (Google .npz, timm .safetensors/.pth, an orbax training
workdir, whose config.json names the model). The pre-processing is the model family's eval preset at the model's
resolution (or the --pretrained checkpoint's own, or --pp). Every example is evaluated exactly once, sharded
over all devices; results are printed and, with --output, written as JSON.

Flags, the checkpoint file, the model and its options, the datasets, splits and label keys and the --output path
are all checked before anything is loaded or compiled; a bad one ends the command with one line,
`error: <what is wrong>: <how to fix it>`, and exit status 1 (--traceback shows the stack instead).
`command(argv)` runs the same command in-process (tests); this module defines flags on absl's global FLAGS only
when run as a script.
"""
import json
import os
import sys
from typing import Any, NamedTuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from mixer_jax import cli  # noqa: E402  (light: it imports jax only when called)


def define_flags(flag_values: flags.FlagValues) -> None:
  """eval.py's flags on `flag_values`."""
  on = dict(flag_values=flag_values)
  flags.DEFINE_string('checkpoint', None, 'Checkpoint file or orbax workdir (required).', **on)
  flags.DEFINE_string('model', None, 'Model name (default: the workdir config.json or the --pretrained entry).', **on)
  flags.DEFINE_string('model_options', '', 'Model options as key=value,... (e.g. act=gelu).', **on)
  flags.DEFINE_string('pretrained', None, 'A mixer_jax.convert.pretrained entry: model, pre-processing, expected.',
                      **on)
  flags.DEFINE_string('dataset', 'imagenet2012', 'tfds name, fashion_mnist, or imagefolder:<root>.', **on)
  flags.DEFINE_string('split', 'validation', 'Split to evaluate, e.g. validation or test[:50%].', **on)
  flags.DEFINE_string('data_dir', None, 'tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).', **on)
  flags.DEFINE_string('label_key', 'label', 'Label feature: label, or real_label for imagenet2012_real.', **on)
  flags.DEFINE_string('pp', None, 'Pre-processing string (default: the family preset).', **on)
  flags.DEFINE_integer('resolution', None, 'Evaluation resolution (default: the model\'s).', lower_bound=1, **on)
  flags.DEFINE_integer('batch_size', 256, 'Global batch size.', lower_bound=1, **on)
  flags.DEFINE_list('fewshot', [], 'Few-shot linear probes on pre_logits: big_vision names (cifar100, pets, caltech, '
                    'cars, dtd, uc_merced, imagenet) or tfds names with train/test splits.', **on)
  flags.DEFINE_list('fewshot_shots', ['1', '5', '10', '25'], 'Training examples per class of the few-shot probes.',
                    **on)
  flags.DEFINE_string('output', None, 'Write the results as JSON here.', **on)
  flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.', **on)
  cli.define_distributed_flags(flag_values)
  flags.adopt_module_key_flags(cli, **on)


def model_spec(checkpoint_path: str, model: str | None, options: dict, entry) -> tuple[str, dict]:
  """The model name and options: flags first, then the --pretrained entry, then the workdir's config.json (whose
  options describe its own model only)."""
  config_path = os.path.join(checkpoint_path, 'config.json')
  if os.path.isdir(checkpoint_path) and os.path.exists(config_path):
    saved = saved_model(config_path)
    if not model or model == saved['name']:
      model = saved.pop('name')
      options = {**saved, **options}
  if entry is not None:
    model = model or entry.model
    options = {**dict(entry.options), **options}
  if not model:
    raise ValueError('no model to evaluate: give --model (or --pretrained, or a training workdir holding '
                     'config.json)')
  return model, options


def saved_model(config_path: str) -> dict:
  """The `model` entry (name and options) of a training workdir's config.json."""
  try:
    with open(config_path) as f:
      saved = json.load(f).get('model')
  except (ValueError, AttributeError):  # not JSON, or JSON but not an object
    saved = None
  if not (isinstance(saved, dict) and isinstance(saved.get('name'), str)):
    raise ValueError(f'{config_path} is not a training config (it names no model.name): repair it, or give --model '
                     'and --model_options')
  return dict(saved)


def positive_ints(values: list[str], flag: str) -> tuple[int, ...]:
  if not values or not all(v.strip().isdigit() and int(v) > 0 for v in values):
    raise ValueError(f'{flag}={",".join(values)}: give positive integers separated by commas, e.g. 1,5,10,25')
  return tuple(int(v) for v in values)


def dataset_source(dataset: str, splits: tuple[str, ...], data_dir: str | None):
  """The `mixer_jax.data.sources` source of `dataset`, after checking (reading no example) that it is there with
  `splits`."""
  from mixer_jax.data import sources
  source = sources.get(dataset, data_dir)
  for split in splits:
    source.count(split)
  return source


def check_examples(spec: dict, pp: str, num_classes: int, image_shape: tuple[int, int, int]) -> None:
  """The pipeline's batches (their tf.data `spec`, known before any example is read) hold what the evaluation
  needs: images of the model's shape (where the pp fixes it) and one-hot `labels` as wide as the head. `pp` names
  the pre-processing in the errors."""
  missing = [key for key in ('image', 'labels') if key not in spec]
  if missing:
    raise ValueError(f'{pp} gives no {" and no ".join(missing)}: end it with '
                     f'|onehot({num_classes}, key="label", key_result="labels")|keep("image", "labels")')
  labels, image = spec['labels'].shape[1:], spec['image'].shape[1:]
  if labels != (num_classes,):
    raise ValueError(f'{pp} gives labels of shape {tuple(labels)}, not ({num_classes},): one-hot them for '
                     f'the {num_classes}-class head, e.g. onehot({num_classes}, key="label", key_result="labels")')
  if image.is_fully_defined() and tuple(image) != image_shape:
    raise ValueError(f'{pp} gives {"x".join(map(str, image))} images, but the model takes '
                     f'{"x".join(map(str, image_shape))}: resize or crop to it (or set --resolution)')


def fewshot_pp(family: str, resolution: int, channels: int) -> str:
  """big_vision's few-shot pre-processing (resize both sides to 256/224 of the resolution, centre crop) with the
  value range the family's weights expect."""
  values = ('value_range(-1, 1)' if family == 'mixer'
            else 'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))')
  return (f'decode(channels={channels})|resize({resolution * 256 // 224})|central_crop({resolution})|{values}|'
          'keep("image", "label")')


def run(argv: list[str], flag_values) -> dict | None:
  """Evaluates as `flag_values` say, prints the results and writes them to --output; returns them (None on
  processes other than 0). A user error ends the process with one line (SystemExit)."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {" ".join(argv[1:])}: every option is a --flag=value (--help lists them)')
  cli.run(lambda: cli.initialize_distributed(flag_values), traceback=flag_values.traceback)
  results = cli.run(lambda: evaluate_checkpoint(flag_values), traceback=flag_values.traceback)
  import jax
  if jax.process_index():  # every process computed the same global results; one reports them
    return None
  print(json.dumps(results, indent=2))
  if flag_values.output:
    with open(flag_values.output, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def command(argv: list[str]) -> dict | None:
  """`python eval.py <argv[1:]>` in this process (tests): fresh flags, the same parsing and errors."""
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  return run(cli.parse_flags(flag_values, argv), flag_values)


class Plan(NamedTuple):
  """What the flags ask for, every part checked."""
  entry: Any  # the --pretrained table entry, or None
  name: str
  options: dict  # the model's, from the flags, the entry and the workdir's config.json
  given: dict  # --model_options alone
  mesh: Any
  source: Any  # the evaluated dataset's mixer_jax.data.sources source
  probes: dict  # few-shot probe name -> (dataset, train split, test split)
  shots: tuple[int, ...]


def check_arguments(fv) -> Plan:
  """Every flag, the checkpoint file, the model and the datasets, before anything is loaded or compiled."""
  from mixer_jax import convert, data, sharding
  from mixer_jax.convert import files, pretrained
  from mixer_jax.evaluators import fewshot
  if not fv.checkpoint:
    raise ValueError('--checkpoint is required: give a .npz, .safetensors or .pth file, or an orbax workdir')
  shots = positive_ints(fv.fewshot_shots, '--fewshot_shots')
  if fv.output:
    cli.check_output_file(fv.output, '--output')
  entry = pretrained.get(fv.pretrained) if fv.pretrained else None
  files.checkpoint_format(fv.checkpoint)
  given = cli.parse_options(fv.model_options, '--model_options')
  if 'image_size' in given:
    raise ValueError('--model_options: image_size is the evaluation size: give it with --resolution')
  name, options = model_spec(fv.checkpoint, fv.model, given, entry)
  convert.check_model(name, given, '--model' if fv.model else os.path.join(fv.checkpoint, 'config.json'))
  mesh = sharding.make_mesh((-1, 1, 1))
  sharding.check_batch_size(fv.batch_size, mesh)
  source = dataset_source(fv.dataset, (fv.split,), fv.data_dir)
  if fv.pp:
    data.ops.parse(fv.pp)
  elif fv.label_key not in source.features():  # the preset pp one-hots it
    raise ValueError(f'--label_key={fv.label_key}: {fv.dataset} has no such feature; its features are '
                     f'{", ".join(source.features())}')
  probes = {}
  for probe in fv.fewshot:
    dataset, train_split, test_split = fewshot.BIG_VISION_DATASETS.get(probe, (probe, 'train', 'test'))
    try:
      features = dataset_source(dataset, (train_split, test_split), fv.data_dir).features()
    except (ValueError, OSError) as error:
      raise type(error)(f'--fewshot={probe}: {error}') from None
    if 'label' not in features:
      raise ValueError(f'--fewshot={probe}: {dataset} has no feature "label" for the probes; its features are '
                       f'{", ".join(features)}')
    probes[probe] = (dataset, train_split, test_split)
  return Plan(entry, name, options, given, mesh, source, probes, shots)


def evaluate_checkpoint(flag_values) -> dict:
  import jax
  from mixer_jax import convert, models, sharding
  from mixer_jax.data import presets
  from mixer_jax.evaluators import classification, fewshot
  fv = flag_values
  entry, name, options, given, mesh, source, probes, shots = check_arguments(fv)

  # --- The model ----------------------------------------------------------------------------------------------
  architecture = {k: v for k, v in options.items() if k not in convert.CHECKPOINT_OPTIONS}
  variables = convert.load(fv.checkpoint, name, **architecture)
  fixed = convert.tree_options(name, variables['params'])
  for key in sorted(set(given) & set(fixed)):  # the checkpoint's head and token grid: allowed where they agree
    if given[key] != fixed[key]:
      raise ValueError(f'--model_options: {key}={given[key]}, but the checkpoint has {key}={fixed[key]}: leave it '
                       'out')
  family = models.family(name)
  resolution = fv.resolution or fixed.get('image_size') or models.variant(name).kwargs.get('image_size', 224)
  if family == 'mixer' and resolution != fixed['image_size']:
    raise ValueError(f'--resolution={resolution}: {name} from {fv.checkpoint} runs at {fixed["image_size"]}x'
                     f'{fixed["image_size"]} only; fine-tune it at another resolution with configs/finetune.py:res=...')
  model = models.create(name, **{**options, **fixed, 'image_size': resolution})
  variables = models.stack_blocks(variables, model)  # a workdir's scan_blocks=True: its own layout
  num_classes = fixed['num_classes']
  if not num_classes:
    raise ValueError(f'{fv.checkpoint} has no classification head to evaluate: fine-tune it first '
                     '(configs/finetune.py)')
  dataset_classes = source.label_classes(fv.label_key)
  if dataset_classes and dataset_classes > num_classes:
    raise ValueError(f'--dataset={fv.dataset} has {dataset_classes} classes but {fv.checkpoint} has a '
                     f'{num_classes}-class head: evaluate it on the dataset it was trained for')

  labels = f'onehot({num_classes}, key="{fv.label_key}", key_result="labels")|keep("image", "labels")'
  if fv.pp:
    pp = fv.pp
  elif entry is not None and entry.image_pp:
    pp = f'{entry.image_pp}|{labels}'
  else:
    pp = presets.eval_pp(family, resolution=resolution, num_classes=num_classes, label_key=fv.label_key)

  if model.in_channels != 3:  # e.g. the grayscale quickstart models
    pp = pp.replace('decode|', f'decode(channels={model.in_channels})|', 1)
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), variables)
  predict = lambda v, x: model.apply(v, x, train=False)
  context = dict(variables_shardings=replicated, defaults=dict(dataset=fv.dataset, data_dir=fv.data_dir,
                                                               batch_size=fv.batch_size, loss='softmax_xent'))
  evaluator = classification.Evaluator(predict, mesh, split=fv.split, pp=pp, **context)
  check_examples(evaluator.stream.dataset.element_spec, f'--pp={pp}' if fv.pp else f'the pre-processing {pp}',
                 num_classes, (resolution, resolution, model.in_channels))

  # --- Evaluation ---------------------------------------------------------------------------------------------
  variables = jax.device_put(variables, replicated)
  metrics = dict(evaluator.run(variables))
  results = dict(checkpoint=fv.checkpoint, model=name, dataset=fv.dataset, split=fv.split, label_key=fv.label_key,
                 pp=pp, devices=mesh.devices.size, **metrics)
  for probe, (dataset, train_split, test_split) in probes.items():
    cfg = dict(dataset=dataset, train_split=train_split, test_split=test_split, data_dir=fv.data_dir,
               batch_size=fv.batch_size, pp=fewshot_pp(family, resolution, model.in_channels),
               name=probe if probe in fewshot.BIG_VISION_DATASETS else None,  # None: named after the dataset
               shots=shots)
    results.update(fewshot.Evaluator(predict, mesh, **context, **cfg).run(variables))
  if entry is not None:
    results.update(pretrained=fv.pretrained, expected_top1=entry.top1, expected_source=entry.source, note=entry.note)
    if entry.top1 is not None and fv.dataset == 'imagenet2012' and fv.split == 'validation':
      logging.info('%s: expected top-1 %.2f%% (%s), measured %.2f%%', fv.pretrained, entry.top1, entry.source,
                   100 * metrics['top1'])
  return results


def main(argv: list[str]) -> None:  # absl's app.run exits with main's return value: this returns nothing
  cli.quiet_library_logs(logging.get_absl_handler())
  run(argv, flags.FLAGS)


if __name__ == '__main__':
  cli.quiet_libtpu_probe()
  cli.preload_tcmalloc()
  define_flags(flags.FLAGS)
  app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv))
