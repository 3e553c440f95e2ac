"""python -m mixer_jax.convert --from {npz,timm,orbax} --to {orbax,npz,timm} [--model NAME] IN OUT

Converts a checkpoint between Google's Mixer .npz, timm/PyTorch (.safetensors or .pth) and orbax, checking every
name and shape against the model: --model and its options (--model_options key=value,..., the options configs and
eval.py take), or, for a training workdir, the model its config.json records.

  python -m mixer_jax.convert --from npz --to timm --model mixer_b16 Mixer-B_16.npz mixer_b16.safetensors
  python -m mixer_jax.convert --from orbax --to npz workdirs/quickstart quickstart.npz

The input (what it holds, that --from says so), the model and its options and the output (its folder, a suffix
the format is read back by) are checked before anything is loaded; every error is one line, `error: ...`, with
exit status 1.
"""
import importlib.util

from mixer_jax import cli  # light: no JAX inside

_FORMAT_OF = {'npz': 'npz', 'safetensors': 'timm', 'torch': 'timm', 'orbax': 'orbax'}


def check_output(path: str, target: str, model: str) -> None:
  """`path` can be written as `target`, in a form `convert.load` reads back, for `model`."""
  from mixer_jax import models, paths
  from mixer_jax.convert import files
  if target == 'orbax' and paths.at(path).exists():
    raise ValueError(f'output {path} already exists: --to=orbax writes a new directory; give a new name')
  suffixes = {'npz': ('.npz',), 'timm': ('.safetensors', *files.TORCH_SUFFIXES)}.get(target, ())
  if suffixes and not path.lower().endswith(suffixes):
    raise ValueError(f'output {path}: --to={target} files are read back by their suffix, {", ".join(suffixes)}: '
                     'name the output so')
  if target == 'npz' and models.family(model) != 'mixer':
    raise ValueError(f'--to=npz writes Google\'s MLP-Mixer layout, and {model} is a {models.family(model)}: use '
                     '--to=timm or --to=orbax')
  if target == 'timm' and not path.lower().endswith('.safetensors') and not importlib.util.find_spec('torch'):
    raise ValueError(f'output {path}: writing PyTorch files needs PyTorch (pip install torch): write .safetensors')
  if paths.is_url(path):
    paths.check_writable(path.rsplit('/', 1)[0], 'output')
  else:
    cli.check_output_file(path, 'output')


def main(argv=None) -> None:
  parser = cli.ArgumentParser(prog='python -m mixer_jax.convert', description=__doc__)
  parser.add_argument('--from', dest='source', choices=('npz', 'timm', 'orbax'), required=True,
                      help='the input\'s format: npz (Google\'s Mixer files), timm (.safetensors, .pth), orbax (a '
                      'training workdir, or a folder written by --to=orbax)')
  parser.add_argument('--to', dest='target', choices=('orbax', 'npz', 'timm'), required=True,
                      help='the output\'s format (timm: .safetensors, or .pth with PyTorch installed)')
  parser.add_argument('--model', help='mixer_jax model name, e.g. mixer_b16 (default: a training workdir\'s, from its '
                      'config.json)')
  parser.add_argument('--model_options', default='', help='model options, e.g. act=gelu (timm Mixer weights)')
  parser.add_argument('input', help='checkpoint file or folder, local or gs://; an https:// file, hf-hub:OWNER/REPO or '
                      'a pretrained table name, downloaded once into the cache')
  parser.add_argument('output', help='file or (--to=orbax) new folder to write')
  args = parser.parse_args(argv)

  from mixer_jax import convert, models, paths
  from mixer_jax.convert import files

  def convert_file():
    found = _FORMAT_OF[files.checkpoint_format(args.input)]
    if found != args.source:
      raise ValueError(f'{args.input} is in the {found} format, not {args.source}: give --from={found}')
    options = cli.parse_options(args.model_options, '--model_options')
    run = convert.run_config(args.input) if found == 'orbax' else None
    model = args.model or (convert.run_model(run)[0] if run is not None else None)
    if not model:
      raise ValueError('--model is required: name the model the checkpoint holds, e.g. --model=mixer_b16 (a '
                       'training workdir\'s config.json names it)')
    convert.check_model(model, options)
    output = paths.resolve(args.output)
    check_output(output, args.target, model)
    variables = convert.load(args.input, model, **options)
    convert.save(variables, output, model, args.target)
    return model, variables

  model, variables = cli.run(convert_file)
  print(f'wrote {args.output} ({args.target}): {model}, {models.count_params(variables["params"]):,} parameters')


if __name__ == '__main__':
  main()
