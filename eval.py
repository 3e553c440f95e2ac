"""Evaluate a checkpoint on a dataset split: top-1, top-5, loss, images/s (and ImageNet-ReaL, few-shot probes).

  python eval.py --checkpoint=Mixer-B_16.npz --model=mixer_b16 --data_dir=TFDS_DIR
  python eval.py --checkpoint=davit_tiny.safetensors --pretrained=davit_tiny.msft_in1k --data_dir=TFDS_DIR
  python eval.py --checkpoint=WORKDIR --dataset=imagenet2012_real --label_key=real_label   (ImageNet-ReaL)
  python eval.py --checkpoint=WORKDIR --dataset=fashion_mnist --split=test --fewshot=cifar100,pets --output=r.json

The checkpoint is any format mixer_jax.convert reads (Google .npz, timm .safetensors/.pth, an orbax training
workdir, whose config.json names the model). The pre-processing is the model family's eval preset at the model's
resolution (or the --pretrained checkpoint's own, or --pp). Every example is evaluated exactly once, sharded
over all devices; results are printed and, with --output, written as JSON.
"""
import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402

from mixer_jax import cli  # noqa: E402  (light: it imports jax only when called)

flags.DEFINE_string('checkpoint', None, 'Checkpoint file or orbax workdir.')
flags.DEFINE_string('model', None, 'Model name (default: the workdir config.json or the --pretrained entry).')
flags.DEFINE_string('model_options', '', 'Model options as key=value,... (e.g. act=gelu).')
flags.DEFINE_string('pretrained', None, 'A mixer_jax.convert.pretrained entry: model, pre-processing, expected.')
flags.DEFINE_string('dataset', 'imagenet2012', 'tfds name, fashion_mnist, or imagefolder:<root>.')
flags.DEFINE_string('split', 'validation', 'Split to evaluate, e.g. validation or test[:50%].')
flags.DEFINE_string('data_dir', None, 'tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).')
flags.DEFINE_string('label_key', 'label', 'Label feature: label, or real_label for imagenet2012_real.')
flags.DEFINE_string('pp', None, 'Pre-processing string (default: the family preset).')
flags.DEFINE_integer('resolution', None, 'Evaluation resolution (default: the model\'s).')
flags.DEFINE_integer('batch_size', 256, 'Global batch size.')
flags.DEFINE_list('fewshot', [], 'Few-shot linear probes on pre_logits: big_vision names (cifar100, pets, caltech, '
                  'cars, dtd, uc_merced, imagenet) or tfds names with train/test splits.')
flags.DEFINE_list('fewshot_shots', ['1', '5', '10', '25'], 'Training examples per class of the few-shot probes.')
flags.DEFINE_string('output', None, 'Write the results as JSON here.')
flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.')
flags.mark_flags_as_required(['checkpoint'])
cli.define_distributed_flags(flags)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def model_spec(checkpoint_path: str, model: str | None, options: dict, entry) -> tuple[str, dict]:
  """The model name and options: flags first, then the --pretrained entry, then the workdir's config.json."""
  config_path = os.path.join(checkpoint_path, 'config.json')
  if os.path.isdir(checkpoint_path) and os.path.exists(config_path):
    with open(config_path) as f:
      saved = dict(json.load(f)['model'])
    model = model or saved.pop('name')
    options = {**saved, **options}
  if entry is not None:
    model = model or entry.model
    options = {**dict(entry.options), **options}
  if not model:
    raise ValueError('give --model (or --pretrained, or a training workdir holding config.json)')
  return model, options


def fewshot_pp(family: str, resolution: int, channels: int) -> str:
  """big_vision's few-shot pre-processing (resize both sides to 256/224 of the resolution, centre crop) with the
  value range the family's weights expect."""
  values = ('value_range(-1, 1)' if family == 'mixer'
            else 'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))')
  return (f'decode(channels={channels})|resize({resolution * 256 // 224})|central_crop({resolution})|{values}|'
          'keep("image", "label")')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_library_logs(logging.get_absl_handler())
  cli.run(lambda: cli.initialize_distributed(FLAGS), traceback=FLAGS.traceback)
  results = cli.run(evaluate_checkpoint, traceback=FLAGS.traceback)
  import jax
  if jax.process_index():  # every process computed the same global results; one reports them
    return
  print(json.dumps(results, indent=2))
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      json.dump(results, f, indent=2)


def evaluate_checkpoint() -> dict:
  import jax
  from mixer_jax import convert, data, models, sharding
  from mixer_jax.convert import pretrained
  from mixer_jax.data import presets
  from mixer_jax.evaluators import classification, fewshot

  entry = pretrained.get(FLAGS.pretrained) if FLAGS.pretrained else None
  name, options = model_spec(FLAGS.checkpoint, FLAGS.model, cli.parse_options(FLAGS.model_options, '--model_options'), entry)
  for key in ('num_classes', 'image_size', 'tokens_mlp_dim'):  # the checkpoint decides these
    options.pop(key, None)
  variables = convert.load(FLAGS.checkpoint, name, **options)
  fixed = convert.tree_options(name, variables['params'])
  family = models.family(name)
  resolution = FLAGS.resolution or fixed.get('image_size') or models.variant(name).kwargs.get('image_size', 224)
  if family == 'mixer' and resolution != fixed['image_size']:
    raise ValueError(f'{name} from {FLAGS.checkpoint} runs at {fixed["image_size"]}x{fixed["image_size"]} only; '
                     'fine-tune it at another resolution with configs/finetune.py:res=...')
  model = models.create(name, **{**options, **fixed, 'image_size': resolution})
  num_classes = fixed['num_classes']
  if not num_classes:
    raise ValueError(f'{FLAGS.checkpoint} has no classification head to evaluate')

  labels = f'onehot({num_classes}, key="{FLAGS.label_key}", key_result="labels")|keep("image", "labels")'
  if FLAGS.pp:
    pp = FLAGS.pp
  elif entry is not None and entry.image_pp:
    pp = f'{entry.image_pp}|{labels}'
  else:
    pp = presets.eval_pp(family, resolution=resolution, num_classes=num_classes, label_key=FLAGS.label_key)

  if model.in_channels != 3:  # e.g. the grayscale quickstart models
    pp = pp.replace('decode|', f'decode(channels={model.in_channels})|', 1)

  mesh = sharding.make_mesh((-1, 1, 1))
  sharding.check_batch_size(FLAGS.batch_size, mesh)
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), variables)
  variables = jax.device_put(variables, replicated)
  step = classification.make_step(lambda v, x: model.apply(v, x, train=False)[0], 'softmax_xent', mesh, replicated)
  stream = data.eval_iter(FLAGS.dataset, FLAGS.split, pp=pp, global_batch_size=FLAGS.batch_size,
                          data_dir=FLAGS.data_dir)
  metrics = classification.evaluate(step, variables, stream, mesh)
  results = dict(checkpoint=FLAGS.checkpoint, model=name, dataset=FLAGS.dataset, split=FLAGS.split,
                 label_key=FLAGS.label_key, pp=pp, devices=mesh.devices.size, **metrics)
  for name in FLAGS.fewshot:
    dataset, train_split, test_split = fewshot.BIG_VISION_DATASETS.get(name, (name, 'train', 'test'))
    cfg = dict(dataset=dataset, train_split=train_split, test_split=test_split, data_dir=FLAGS.data_dir,
               batch_size=FLAGS.batch_size, pp=fewshot_pp(family, resolution, model.in_channels),
               name=name if name in fewshot.BIG_VISION_DATASETS else None,  # None: named after the dataset
               shots=tuple(int(k) for k in FLAGS.fewshot_shots))
    results.update(fewshot.evaluate(lambda v, x: model.apply(v, x, train=False), variables, mesh, cfg))
  if entry is not None:
    results.update(pretrained=FLAGS.pretrained, expected_top1=entry.top1, expected_source=entry.source,
                   note=entry.note)
    if entry.top1 is not None and FLAGS.dataset == 'imagenet2012' and FLAGS.split == 'validation':
      logging.info('%s: expected top-1 %.2f%% (%s), measured %.2f%%', FLAGS.pretrained, entry.top1, entry.source,
                   100 * metrics['top1'])
  return results


if __name__ == '__main__':
  cli.preload_tcmalloc()
  app.run(main)
