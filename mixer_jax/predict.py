"""python -m mixer_jax.predict --checkpoint=CHECKPOINT IMAGE [IMAGE ...]

Classifies image files with a checkpoint and prints each one's most likely classes, named where the dataset names
them.

  python -m mixer_jax.predict --checkpoint=workdirs/quickstart sneaker.png shirt.png
  python -m mixer_jax.predict --checkpoint=davit_tiny.safetensors --pretrained=davit_tiny.msft_in1k photo.jpg
  python -m mixer_jax.predict --checkpoint=Mixer-B_16.npz --model=mixer_b16 --top=3 --output=top3.json *.jpg

The checkpoint is read as eval.py reads it (mixer_jax/inference.py). A training workdir runs its own model on
images pre-processed as its first evaluation pre-processed them, and its training dataset names the classes.
Any other checkpoint takes the --pretrained entry's pre-processing or its family's evaluation preset, and
--dataset names its classes (by default ImageNet's WordNet ids for a 1000-class head); where the default names
cannot be read, the classes go by number. Only the image ops of the pre-processing run (its label ops, onehot and
keep, are left out); --pp replaces them. Scores are the softmax of the logits (the sigmoid for a run trained with
sigmoid_xent). Every error is one line, `error: ...`, with exit status 1.
"""
import json
import os

import numpy as np

from mixer_jax import cli

LABEL_OPS = ('onehot', 'keep')  # the label tail of an evaluation pp (configs/common.py labels)


def image_pipeline(pp: str):
  """The image ops of an evaluation pp string, parsed."""
  from mixer_jax.data import ops
  return ops.Pipeline(tuple(op for op in ops.parse(pp).ops if op.name not in LABEL_OPS))


def load_images(files: list[str], pipeline, shape: tuple[int, int, int]) -> np.ndarray:
  """The files pre-processed by `pipeline` into one float32 batch of images of `shape`; a file that is missing, is
  no image, or comes out in another shape is a one-line error."""
  import tensorflow as tf
  images = []
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such image file')
    try:
      image = pipeline({'image': tf.io.read_file(path)})['image'].numpy()
    except tf.errors.InvalidArgumentError:
      raise ValueError(f'{path} is not an image TensorFlow decodes (JPEG, PNG, GIF or BMP)') from None
    if image.shape != shape:
      resize = f'{pipeline.ops[0].text}|resize({shape[0]})|' + '|'.join(op.text for op in pipeline.ops[1:])
      raise ValueError(f'{path} comes out of the pre-processing {pipeline} as a {"x".join(map(str, image.shape))} '
                       f'image, but the model takes {"x".join(map(str, shape))}: give a --pp that resizes it, e.g. '
                       f'--pp=\'{resize}\'')
    images.append(image.astype(np.float32))
  return np.stack(images)


def class_names(dataset: str | None, data_dir: str | None, num_classes: int) -> list[str] | None:
  """The names `dataset` gives its `num_classes` classes; None for no dataset or one with another count."""
  from mixer_jax.data import sources
  if dataset is None:
    return None
  names = sources.get(dataset, data_dir).class_names()
  return names if names is not None and len(names) == num_classes else None


def classify(args) -> list[dict]:
  """[{'image': path, 'top': [{'class', 'name', 'score'}, ...]}, ...] for the files of `args` (see main)."""
  import jax
  from mixer_jax import convert, inference, paths
  from mixer_jax.convert import files, pretrained
  if args.checkpoint in pretrained.CHECKPOINTS and not args.pretrained:
    args.pretrained = args.checkpoint  # a table name brings its entry: model and pre-processing
  args.checkpoint = args.checkpoint or args.pretrained
  if not args.checkpoint:
    raise ValueError('--checkpoint is required: give a checkpoint file or workdir, a URL, hf-hub:OWNER/REPO or a '
                     'pretrained table name')
  entry = pretrained.get(args.pretrained) if args.pretrained else None
  files.checkpoint_format(args.checkpoint)
  given = cli.parse_options(args.model_options, '--model_options')
  run, name, options = inference.spec(args.checkpoint, args.model, given, entry)
  convert.check_model(name, given)
  if args.output:
    cli.check_output_file(paths.resolve(args.output), '--output')
  restored = inference.restore(args.checkpoint, name, options, given)
  model = restored.model
  evaluations = inference.run_evaluations(run) if run is not None else []
  pp = args.pp or (evaluations[0].pp if evaluations else inference.preset_pp(restored, name, entry))
  data_dir = paths.resolve(args.data_dir)
  if args.dataset:
    names = class_names(args.dataset, data_dir, restored.num_classes)
  else:  # the run's training data, or ImageNet's ids: where they cannot be read, the classes go by number
    dataset = run['input']['dataset'] if run is not None else 'imagenet2012' if restored.num_classes == 1000 else None
    data_dir = data_dir or paths.resolve((run or {}).get('input', {}).get('data_dir'))
    try:
      names = class_names(dataset, data_dir, restored.num_classes)
    except (ValueError, OSError):
      names = None
  images = load_images([paths.resolve(f) for f in args.images], image_pipeline(pp),
                       (restored.resolution, restored.resolution, model.in_channels))

  forward = jax.jit(inference.predict(model))
  logits = np.concatenate([np.asarray(forward(restored.variables, images[i:i + args.batch_size])[0])
                           for i in range(0, len(images), args.batch_size)])
  sigmoid = run is not None and run.get('loss') == 'sigmoid_xent'
  scores = np.asarray(jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1))
  top = np.argsort(-scores, axis=-1, kind='stable')[:, :args.top]
  return [{'image': path, 'top': [{'class': int(c), 'name': names[c] if names else str(c),
                                   'score': float(scores[i, c])} for c in top[i]]}
          for i, path in enumerate(args.images)]


def main(argv=None) -> None:
  parser = cli.ArgumentParser(prog='python -m mixer_jax.predict', description=__doc__)
  parser.add_argument('--checkpoint', help='checkpoint file (.npz, .safetensors, .pth) or training workdir, local '
                      'or gs://; an https:// file, hf-hub:OWNER/REPO or a pretrained table name, downloaded once into '
                      'the cache (required unless --pretrained names one)')
  parser.add_argument('--model', help='model name (default: the workdir\'s config.json or the --pretrained entry)')
  parser.add_argument('--model_options', default='', help='model options key=value,..., as eval.py takes them')
  parser.add_argument('--pretrained', help='a mixer_jax.convert.pretrained entry: model and pre-processing')
  parser.add_argument('--pp', help='pre-processing of each file, from its bytes to the model\'s input (default: '
                      'the run\'s evaluation pp, the --pretrained entry\'s, or the family preset)')
  parser.add_argument('--dataset', help='the dataset whose class names to print (default: the run\'s training '
                      'dataset; imagenet2012 for a 1000-class head)')
  parser.add_argument('--data_dir', help='its tfds data_dir (default: the run\'s, else $TFDS_DATA_DIR)')
  parser.add_argument('--top', type=cli.at_least(1), default=5, help='classes shown per image')
  parser.add_argument('--batch_size', type=cli.at_least(1), default=64, help='images per forward pass')
  parser.add_argument('--output', help='also write the results here as JSON')
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files (JPEG, PNG, GIF, BMP)')
  args = parser.parse_args(argv)
  results = cli.run(lambda: classify(args))
  for row in results:
    print(f'{row["image"]}: ' + ', '.join(f'{t["name"]} {t["score"]:.3f}' for t in row['top']))
  if args.output:
    from mixer_jax import paths
    with open(paths.resolve(args.output), 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
