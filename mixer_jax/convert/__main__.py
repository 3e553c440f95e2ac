"""python -m mixer_jax.convert --from {npz,timm,orbax} --to {orbax,npz,timm} --model NAME IN OUT

Converts a checkpoint between Google's Mixer .npz, timm/PyTorch (.safetensors or .pth) and orbax, checking every
name and shape against the model (options with --model_options key=value,...). Errors are one line.
"""
import argparse
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_FORMAT_OF = {'npz': 'npz', 'safetensors': 'timm', 'torch': 'timm', 'orbax': 'orbax'}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m mixer_jax.convert', description=__doc__.splitlines()[2])
  parser.add_argument('--from', dest='source', choices=('npz', 'timm', 'orbax'), required=True)
  parser.add_argument('--to', dest='target', choices=('orbax', 'npz', 'timm'), required=True)
  parser.add_argument('--model', required=True, help='mixer_jax model name, e.g. mixer_b16')
  parser.add_argument('--model_options', default='', help='model options, e.g. act=gelu (timm Mixer weights)')
  parser.add_argument('input')
  parser.add_argument('output')
  args = parser.parse_args(argv)

  from mixer_jax import cli, convert, models
  from mixer_jax.convert import files

  def convert_file():
    found = _FORMAT_OF[files.checkpoint_format(args.input)]
    if found != args.source:
      raise ValueError(f'{args.input} is a {found} checkpoint, not {args.source}')
    variables = convert.load(args.input, args.model, **cli.parse_options(args.model_options, '--model_options'))
    convert.save(variables, args.output, args.model, args.target)
    return variables

  variables = cli.run(convert_file)
  print(f'wrote {args.output} ({args.target}): {args.model}, {models.count_params(variables["params"]):,} parameters')


if __name__ == '__main__':
  main()
