"""Evaluate a checkpoint: top-1, top-5, loss, images/s on dataset splits (and ImageNet-ReaL, few-shot probes).

  python eval.py --checkpoint=workdirs/quickstart                  (a training run, evaluated as the run did)
  python eval.py --checkpoint=WORKDIR --split=test[:50%]           (another split, with the run's pre-processing)
  python eval.py --checkpoint=Mixer-B_16.npz --model=mixer_b16 --data_dir=TFDS_DIR
  python eval.py --checkpoint=davit_tiny.safetensors --pretrained=davit_tiny.msft_in1k --data_dir=TFDS_DIR
  python eval.py --checkpoint=Mixer-B_16.npz --model=mixer_b16 --dataset=imagenet2012_real --label_key=real_label
  python eval.py --checkpoint=WORKDIR --fewshot=cifar100,pets --output=results.json

The checkpoint is any format mixer_jax.convert reads: Google .npz, timm .safetensors/.pth, or an orbax training
workdir. A workdir is evaluated as its run evaluated it: its config.json names the model with its options and
the run's evaluations (`config.evals`: dataset, split, pre-processing, batch size), and --dataset / --split choose
among them, or give data the run never evaluated, pre-processed as the run's evaluation of that dataset (else its
first). Any other checkpoint is evaluated on --dataset / --split (default ImageNet validation) with the
--pretrained entry's pre-processing or the model family's eval preset at the model's resolution. --pp replaces either (a --pp that
differs from the run's is noted in the log). Each evaluation logs the pre-processing it used. Every example counts
exactly once, sharded over all devices; the results are printed as JSON (`evals`: one entry per evaluation, named
as the run named it, else after the split) and, with --output, written to a file.

Flags, the checkpoint file, the model and its options, the datasets, splits and label keys and the --output path
are all checked before anything is loaded or compiled; a bad one ends the command with one line,
`error: <what is wrong>: <how to fix it>`, and exit status 1 (--traceback shows the stack instead).
`command(argv)` runs the same command in-process (tests); this module defines flags on absl's global FLAGS only
when run as a script.
"""
import json
import sys
from typing import Any, NamedTuple

from absl import app, flags, logging

from mixer_jax import cli, paths  # light: they import jax only when called



def define_flags(flag_values: flags.FlagValues) -> None:
  """eval.py's flags on `flag_values`."""
  on = dict(flag_values=flag_values)
  flags.DEFINE_string('checkpoint', None, 'Checkpoint file or orbax workdir, local or gs://; an https:// file, '
                      'hf-hub:OWNER/REPO or a pretrained table name, downloaded once into the cache (required unless '
                      '--pretrained names one).', **on)
  flags.DEFINE_string('model', None, 'Model name (default: the workdir config.json or the --pretrained entry).', **on)
  flags.DEFINE_string('model_options', '', 'Model options as key=value,..., as convert and configs name them (e.g. '
                      'act=gelu; image_size=384: the evaluation resolution of a ConvMixer or DaViT).', **on)
  flags.DEFINE_string('pretrained', None, 'A mixer_jax.convert.pretrained entry: model, pre-processing, expected.',
                      **on)
  flags.DEFINE_string('dataset', None, 'tfds name, fashion_mnist, or imagefolder:<root> (default: a workdir\'s own '
                      'evaluations, else imagenet2012).', **on)
  flags.DEFINE_string('split', None, 'Split to evaluate, e.g. validation or test[:50%] (default: a workdir\'s own '
                      'evaluations, else validation).', **on)
  flags.DEFINE_string('data_dir', None, 'tfds data_dir (default: the run\'s, else $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).', **on)
  flags.DEFINE_string('label_key', 'label', 'Label feature of the family preset: label, or real_label for '
                      'imagenet2012_real (a run\'s own pre-processing names its own).', **on)
  flags.DEFINE_string('pp', None, 'Pre-processing string (default: a workdir\'s own evaluation pp, the --pretrained '
                      'entry\'s, else the family preset).', **on)
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the run\'s evaluation batch, else 256).',
                       lower_bound=1, **on)
  flags.DEFINE_list('fewshot', [], 'Few-shot linear probes on pre_logits: big_vision names (cifar100, pets, caltech, '
                    'cars, dtd, uc_merced, imagenet) or tfds names with train/test splits.', **on)
  flags.DEFINE_list('fewshot_shots', ['1', '5', '10', '25'], 'Training examples per class of the few-shot probes.',
                    **on)
  flags.DEFINE_string('output', None, 'Write the results as JSON here.', **on)
  flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.', **on)
  cli.define_distributed_flags(flag_values)
  flags.adopt_module_key_flags(cli, **on)


def evaluations(fv, run: dict | None) -> list:
  """The `inference.Evaluation`s the flags `fv` ask for. A training workdir (`run`, its config.json): its own
  evaluations, or those of --dataset / --split if given; a dataset or split it never evaluated (named after its
  split) takes the pre-processing of its evaluation of the same dataset, else of its first. Anything else:
  --dataset / --split (default imagenet2012 validation), pre-processed as `inference.preset_pp` says. --pp,
  --data_dir and --batch_size replace what they name."""
  from mixer_jax import inference
  from mixer_jax.data import sources
  dataset = sources.resolve(fv.dataset)
  own = inference.run_evaluations(run) if run is not None else []
  chosen = [e for e in own if dataset in (None, e.dataset) and fv.split in (None, e.split)]
  if not chosen:
    like = next((e for e in own if e.dataset == dataset), own[0] if own else None)
    if like is None:
      split = fv.split or 'validation'
      chosen = [inference.Evaluation(split, dataset or 'imagenet2012', split, None, None, inference.DEFAULT_BATCH_SIZE)]
    else:
      split = fv.split or like.split
      chosen = [like._replace(name=split, dataset=dataset or like.dataset, split=split)]
      listed = ', '.join(f'{e.name} ({e.dataset} {e.split})' for e in own)
      logging.info('%s %s is none of the run\'s evaluations (%s): evaluating it with the pre-processing of %r',
                   chosen[0].dataset, chosen[0].split, listed, like.name)
  chosen = [e._replace(data_dir=paths.resolve(fv.data_dir) or e.data_dir, batch_size=fv.batch_size or e.batch_size)
            for e in chosen]
  if fv.pp:
    for e in chosen:
      if e.pp is not None and e.pp != fv.pp:
        logging.info('--pp differs from the pre-processing the run evaluated %r with (%s): evaluating with --pp',
                     e.name, e.pp)
    chosen = [e._replace(pp=fv.pp) for e in chosen]
  return chosen


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


def check_examples(spec: dict, pp: str, num_classes: int, image_shape: tuple[int, int, int], *,
                   resizable: bool) -> None:
  """The pipeline's batches (their tf.data `spec`, known before any example is read) hold what the evaluation
  needs: images of the model's shape (where the pp fixes it) and one-hot `labels` as wide as the head. `pp` names
  the pre-processing in the errors; `resizable`: the model runs at any image size (ConvMixer, DaViT)."""
  missing = [key for key in ('image', 'labels') if key not in spec]
  if missing:
    raise ValueError(f'{pp} gives no {" and no ".join(missing)}: end it with '
                     f'|onehot({num_classes}, key="label", key_result="labels")|keep("image", "labels")')
  labels, image = spec['labels'].shape[1:], spec['image'].shape[1:]
  if labels != (num_classes,):
    raise ValueError(f'{pp} gives labels of shape {tuple(labels)}, not ({num_classes},): one-hot them for '
                     f'the {num_classes}-class head, e.g. onehot({num_classes}, key="label", key_result="labels")')
  if image.is_fully_defined() and tuple(image) != image_shape:
    fix = (f'give a --pp that makes {image_shape[2]}-channel images' if image[2] != image_shape[2] else
           'give a --pp that resizes or crops to it' + (f', or --model_options=image_size={image[0]} to run the model '
                                                         'at that size' if resizable and image[0] == image[1] else ''))
    raise ValueError(f'{pp} gives {"x".join(map(str, image))} images, but the model takes '
                     f'{"x".join(map(str, image_shape))}: {fix}')


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
    with open(paths.resolve(flag_values.output), 'w') as f:
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
  evaluations: dict  # inference.Evaluation -> its dataset's mixer_jax.data.sources source
  probes: dict  # few-shot probe name -> (dataset, train split, test split)
  shots: tuple[int, ...]


def check_arguments(fv) -> Plan:
  """Every flag, the checkpoint file, the model and the datasets, before anything is loaded or compiled."""
  from mixer_jax import convert, data, inference, sharding
  from mixer_jax.convert import files, pretrained
  from mixer_jax.evaluators import fewshot
  if fv.checkpoint in pretrained.CHECKPOINTS and not fv.pretrained:
    fv.pretrained = fv.checkpoint  # a table name brings its entry: model, pre-processing, expected accuracy
  if fv.pretrained and not fv.checkpoint:
    fv.checkpoint = fv.pretrained  # downloaded from the entry's source
  if not fv.checkpoint:
    raise ValueError('--checkpoint is required: give a .npz, .safetensors or .pth file, an orbax workdir, a URL, '
                     'hf-hub:OWNER/REPO or a pretrained table name')
  shots = positive_ints(fv.fewshot_shots, '--fewshot_shots')
  if fv.output:
    cli.check_output_file(paths.resolve(fv.output), '--output')
  entry = pretrained.get(fv.pretrained) if fv.pretrained else None
  try:
    files.checkpoint_format(fv.checkpoint)
  except FileNotFoundError:
    if entry is None:
      raise
    raise FileNotFoundError(f'{fv.checkpoint}: no such checkpoint file or directory'
                            f'{pretrained.download_hint(fv.checkpoint, entry)}') from None
  given = cli.parse_options(fv.model_options, '--model_options')
  run, name, options = inference.spec(fv.checkpoint, fv.model, given, entry)
  config_path = paths.join(paths.resolve(fv.checkpoint), convert.RUN_CONFIG)
  convert.check_model(name, given, '--model' if run is None else config_path)
  mesh = sharding.make_mesh((-1, 1, 1))
  chosen = {}
  for evaluation in evaluations(fv, run):
    sharding.check_batch_size(evaluation.batch_size, mesh)
    source = chosen[evaluation] = dataset_source(evaluation.dataset, (evaluation.split,), evaluation.data_dir)
    if evaluation.pp:
      data.ops.parse(evaluation.pp)
    elif fv.label_key not in source.features():  # the preset pp one-hots it
      raise ValueError(f'--label_key={fv.label_key}: {evaluation.dataset} has no such feature; its features are '
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
  return Plan(entry, name, options, given, mesh, chosen, probes, shots)


def evaluate_checkpoint(flag_values) -> dict:
  import jax
  from mixer_jax import inference, models, sharding
  from mixer_jax.evaluators import classification, fewshot
  fv = flag_values
  entry, name, options, given, mesh, chosen, probes, shots = check_arguments(fv)

  # --- The model ----------------------------------------------------------------------------------------------
  restored = inference.restore(fv.checkpoint, name, options, given)
  model, num_classes, resolution = restored.model, restored.num_classes, restored.resolution
  family = models.family(name)
  logging.info('model %s: %s parameters', models.describe(name, {**options, 'image_size': resolution}),
               f'{models.count_params(restored.variables["params"]):,}')

  # --- The evaluations: the run's own pre-processing, or the checkpoint's, or the family preset ------------------
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), restored.variables)
  predict = inference.predict(model)
  context = dict(variables_shardings=replicated, defaults=dict(dataset=None, data_dir=None,
                                                               batch_size=inference.DEFAULT_BATCH_SIZE,
                                                               loss='softmax_xent'))
  evaluators = {}
  for e, data_source in chosen.items():
    pp, source = e.pp, '--pp' if fv.pp else 'the run\'s'
    if pp is None:
      dataset_classes = data_source.label_classes(fv.label_key)
      if dataset_classes and dataset_classes > num_classes:
        raise ValueError(f'--dataset={e.dataset} has {dataset_classes} classes but {fv.checkpoint} has a '
                         f'{num_classes}-class head: evaluate it on the dataset it was trained for')
      pp = inference.preset_pp(restored, name, entry, fv.label_key)
      source = 'the pre-trained entry\'s' if entry and entry.image_pp else f'the {family} preset'
    logging.info('eval %s: %s %s, pre-processing (%s) %s', e.name, e.dataset, e.split, source, pp)
    evaluator = classification.Evaluator(predict, mesh, split=e.split, pp=pp, dataset=e.dataset,
                                         data_dir=e.data_dir, batch_size=e.batch_size, **context)
    check_examples(evaluator.stream.dataset.element_spec, f'--pp={pp}' if fv.pp else f'the pre-processing {pp}',
                   num_classes, (resolution, resolution, model.in_channels), resizable=family != 'mixer')
    evaluators[e] = (evaluator, pp)

  # --- Evaluation ---------------------------------------------------------------------------------------------
  variables = jax.device_put(restored.variables, replicated)
  results = dict(checkpoint=fv.checkpoint, model=name, devices=mesh.devices.size, evals={})
  for e, (evaluator, pp) in evaluators.items():
    metrics = dict(evaluator.run(variables))
    logging.info('eval %s: %s', e.name, evaluator.summary(metrics))
    results['evals'][e.name] = dict(dataset=e.dataset, split=e.split, pp=pp, **metrics)
  for probe, (dataset, train_split, test_split) in probes.items():
    cfg = dict(dataset=dataset, train_split=train_split, test_split=test_split, data_dir=paths.resolve(fv.data_dir),
               batch_size=fv.batch_size or inference.DEFAULT_BATCH_SIZE,
               pp=fewshot_pp(family, resolution, model.in_channels),
               name=probe if probe in fewshot.BIG_VISION_DATASETS else None,  # None: named after the dataset
               shots=shots)
    results.setdefault('fewshot', {}).update(fewshot.Evaluator(predict, mesh, **context, **cfg).run(variables))
  if entry is not None:
    results.update(pretrained=fv.pretrained, expected_top1=entry.top1, expected_source=entry.source, note=entry.note)
    measured = next((results['evals'][e.name] for e in chosen
                     if e.dataset == 'imagenet2012' and e.split == 'validation'), None)
    if entry.top1 is not None and measured:
      logging.info('%s: expected top-1 %.2f%% (%s), measured %.2f%%', fv.pretrained, entry.top1, entry.source,
                   100 * measured['top1'])
  return results


def main(argv: list[str]) -> None:  # absl's app.run exits with main's return value: this returns nothing
  cli.quiet_library_logs(logging.get_absl_handler())
  run(argv, flags.FLAGS)


def script() -> None:
  """`python eval.py` (and the `mixer-jax-eval` command pyproject.toml installs)."""
  cli.preload_tcmalloc()
  define_flags(flags.FLAGS)
  app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv))


if __name__ == '__main__':
  script()
