"""Bad inputs to eval.py and `python -m mixer_jax.convert`: each ends with one line, `error: ...`, exit status 1.

Table-driven and in-process (eval.command, convert's main), on files built once per module: a tiny 28x28
grayscale Mixer as .npz, orbax checkpoint and training workdir, an image folder, and files that are not what their
names say. Two cases run the real commands in subprocesses, where a traceback would show.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import jax

import eval as eval_py
from mixer_jax import convert, models
from mixer_jax.convert import __main__ as convert_main
from test_eval import _image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=7, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16, in_channels=1)
TINY_OPTIONS = '--model_options=' + ','.join(f'{k}={v}' for k, v in TINY.items())
# A correct eval.py command line; each case changes some of it (absl: the last value of a flag counts).
EVAL = ['--checkpoint={root}/tiny.npz', '--model=mixer_s16', TINY_OPTIONS, '--dataset=imagefolder:{root}/photos',
        '--split=test', '--batch_size=8']
CONVERT = ['--from=npz', '--to=orbax', '--model=mixer_s16', TINY_OPTIONS]


def _npz_claiming_terabytes(path):
  """An .npz whose one member's .npy header claims a 1e6 x 1e6 float32 array, followed by 16 bytes."""
  member = io.BytesIO()
  np.lib.format.write_array_header_1_0(member, {'descr': '<f4', 'fortran_order': False, 'shape': (10**6, 10**6)})
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('w.npy', member.getvalue() + bytes(16))


def _safetensors(path, header: bytes, data: bytes = b'', length: int | None = None):
  path.write_bytes((len(header) if length is None else length).to_bytes(8, 'little') + header + data)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad_inputs')
  variables = models.init_variables(models.create('mixer_s16', num_classes=3, image_size=28, **TINY),
                                    jax.random.key(0))
  convert.save(variables, str(root / 'tiny.npz'), 'mixer_s16', 'npz')
  convert.save(variables, str(root / 'orbax'), 'mixer_s16', 'orbax')
  convert.save(variables, str(root / 'workdir' / 'checkpoints' / '1'), 'mixer_s16', 'orbax')
  (root / 'workdir' / 'config.json').write_text(json.dumps({'model': {'name': 'mixer_s16', 'image_size': 28, **TINY}}))
  for name, config in (('float33', {'model': {'name': 'mixer_s16', 'dtype': 'float33', **TINY}}),
                       ('broken_config', {'models': 'mixer_s16'})):
    shutil.copytree(root / 'workdir', root / name)
    (root / name / 'config.json').write_text(json.dumps(config))
  two_classes = models.create('mixer_s16', num_classes=2, image_size=28, **TINY)
  convert.save(models.init_variables(two_classes, jax.random.key(0)), str(root / 'two_classes.npz'), 'mixer_s16',
               'npz')
  _image_folder(root / 'photos', {'train': 2, 'test': 2})
  shutil.copytree(root / 'photos', root / 'corrupt_photos')
  (root / 'corrupt_photos' / 'test' / 'class0' / 'notes.png').write_text('not an image')

  (root / 'text.pth').write_text('weights: see the model card\n')
  (root / 'empty.pth').write_bytes(b'')
  np.save(root / 'array.npy', np.zeros(3))
  shutil.copy(root / 'array.npy', root / 'array.npz')
  (root / 'text.npz').write_text('a b c\n')
  (root / 'page.npz').write_text('<!DOCTYPE html><html><body>Mixer-B_16</body></html>')
  (root / 'lfs.safetensors').write_text('version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n')
  _npz_claiming_terabytes(root / 'terabytes.npz')
  (root / 'empty.safetensors').write_bytes(b'')
  (root / 'text.safetensors').write_text('{"not": "safetensors"}')
  _safetensors(root / 'long_header.safetensors', b'{}', length=10**9)
  header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
  _safetensors(root / 'short_data.safetensors', header, b'\0' * 16)
  _safetensors(root / 'renamed.pth', b'{}')
  (root / 'weights.dat').write_bytes(b'\x00\x01\x02')
  (root / 'empty_dir').mkdir()
  (root / 'not_a_checkpoint').mkdir()
  (root / 'not_a_checkpoint' / 'notes.txt').write_text('hello')
  (root / 'no_steps' / 'checkpoints').mkdir(parents=True)
  (root / 'a_file').write_text('x')
  (root / 'out_dir').mkdir()
  (root / 'dir.npz').mkdir()
  return root


def _error(run, argv: list[str]) -> str:
  """The message a command ends with; asserts it is one `error:` line and the exit status 1."""
  with pytest.raises(SystemExit) as exit_info:
    run(argv)
  message = exit_info.value.code
  assert isinstance(message, str), f'exit status {message!r}, not a message (status 1)'
  assert message.startswith('error: ') and '\n' not in message, message
  return message


def _eval_argv(root, changes):
  return ['eval.py'] + [a.format(root=root) for a in EVAL + list(changes)]


EVAL_CASES = [  # (flags changed from EVAL, a fragment of the message: it names the flag or file and what is wrong)
    # checkpoint files that are not what their suffix says
    (['--checkpoint='], '--checkpoint is required'),
    (['--checkpoint={root}/missing.npz'], 'missing.npz: no such checkpoint file'),
    (['--checkpoint={root}/text.pth'], 'text.pth is a text file, not a PyTorch file'),
    (['--checkpoint={root}/empty.pth'], 'empty.pth is empty, not a PyTorch file'),
    (['--checkpoint={root}/array.npz'], 'array.npz is a single .npy array, not an .npz archive: save the arrays'),
    (['--checkpoint={root}/text.npz'], 'text.npz is a text file, not an .npz archive'),
    (['--checkpoint={root}/page.npz'], 'page.npz is an HTML page'),
    (['--checkpoint={root}/lfs.safetensors'], 'lfs.safetensors is a Git LFS pointer'),
    (['--checkpoint={root}/terabytes.npz'], 'member w.npy claims a 1000000x1000000 float32 array (3,725.29 GiB)'),
    (['--checkpoint={root}/empty.safetensors', '--model=convmixer_256_8', '--model_options='],
     'empty.safetensors is empty, not a .safetensors file'),
    (['--checkpoint={root}/text.safetensors'], 'text.safetensors is a text file, not a .safetensors file'),
    (['--checkpoint={root}/long_header.safetensors', '--model=convmixer_256_8', '--model_options='],
     'long_header.safetensors is truncated or corrupt: its header claims'),
    (['--checkpoint={root}/short_data.safetensors', '--model=convmixer_256_8', '--model_options='],
     'short_data.safetensors is truncated or corrupt: tensor w ends at byte 4,000'),
    (['--checkpoint={root}/renamed.pth'], 'renamed.pth is a .safetensors file, not a PyTorch file: rename it'),
    (['--checkpoint={root}/weights.dat'], 'weights.dat has no checkpoint suffix'),
    (['--checkpoint={root}/empty_dir'], 'empty_dir is an empty directory'),
    (['--checkpoint={root}/not_a_checkpoint'], 'not_a_checkpoint holds no orbax checkpoint'),
    (['--checkpoint={root}/no_steps'], 'holds no complete checkpoint yet'),
    (['--checkpoint={root}/broken_config', '--model='], 'broken_config/config.json is not a training config'),
    (['--checkpoint={root}/float33', '--model=', '--model_options='], 'float33'),
    # the model and its options
    (['--model=mixer_b61'], "--model: unknown model 'mixer_b61' (did you mean mixer_b16"),
    (['--model='], 'no model to run: give --model'),
    (['--model_options=act'], "--model_options: 'act' is not key=value"),
    (['--model_options=hiden_dim=16'], "--model_options: mixer_s16 has no option 'hiden_dim' (did you mean hidden_dim"),
    (['--model_options=hidden_dim=wide'], "--model_options: hidden_dim='wide' does not fit mixer_s16"),
    ([f'{TINY_OPTIONS},tokens_mlp_dim=16'], '--model_options: tokens_mlp_dim=16, but the checkpoint has '
                                            'tokens_mlp_dim=8'),
    ([f'{TINY_OPTIONS},image_size=56'], '--model_options: image_size=56, but mixer_s16 from'),
    (['--pretrained=mixer_b16.goog_in1kk'], "unknown pre-trained checkpoint 'mixer_b16.goog_in1kk' (did you mean"),
    # a 28-pixel checkpoint as another Mixer: the shapes that differ, shallowest first, not the image size
    (['--model=mixer_b16', '--model_options='],
     'tiny.npz does not fit mixer_b16 (num_classes=3, image_size=64): 132 missing'),
    (['--checkpoint={root}/workdir', '--model=mixer_b16', '--model_options='],
     'params/stem/kernel (7, 7, 1, 16) (expected (16, 16, 3, 768))'),
    (['--checkpoint={root}/two_classes.npz'], '--dataset=imagefolder:'),
    # integer flags
    (['--batch_size=0'], 'flag --batch_size=0: 0 is not a positive integer'),
    (['--batch_size=-8'], 'flag --batch_size=-8'),
    (['--batch_size=many'], 'flag --batch_size=many'),
    (['--batch_size=12'], 'batch_size 12 is not divisible by the 8 data-parallel devices'),
    (['--resolution=56'], "Unknown command line flag 'resolution'"),
    (['--fewshot_shots=0'], '--fewshot_shots=0: give positive integers'),
    (['--fewshot_shots=1,five'], '--fewshot_shots=1,five'),
    (['--chekpoint=x'], "Unknown command line flag 'chekpoint'"),
    (['stray'], 'unexpected arguments stray'),
    # data
    (['--label_key=real_label'], '--label_key=real_label: imagefolder:'),
    (['--dataset=cifar10', '--data_dir={root}/a_file/tfds'], 'a_file is a file, not a folder'),
    (['--dataset=cifar10', '--data_dir={root}/a_file'], 'a_file is a file, not a folder'),
    (['--dataset=cifar10', '--data_dir={root}/empty_dir'], "dataset 'cifar10' is not prepared in"),
    (['--dataset=cifar1000'], "unknown dataset 'cifar1000' (did you mean"),
    (['--dataset=imagefolder:{root}/no_photos'], 'no_photos does not exist'),
    (['--dataset=imagefolder:{root}/a_file'], 'a_file is a file, not a folder'),
    (['--split=validation'], "has no split 'validation'"),
    (['--split=test[:'], "malformed split 'test[:'"),
    (['--fewshot=cifar1000'], "--fewshot=cifar1000: unknown dataset 'cifar1000'"),
    (['--pp=decode|resize(-1)'], 'size must be a positive int'),
    (['--dataset=imagefolder:{root}/corrupt_photos'], 'an example failed to load or pre-process'),  # evaluates
    # the output, checked before the evaluation
    (['--output={root}/missing/r.json'], '--output'),
    (['--output={root}/out_dir'], 'out_dir is a directory'),
    (['--output={root}/a_file/r.json'], '--output'),
]


@pytest.mark.parametrize('changes,fragment', EVAL_CASES, ids=[' '.join(c) or 'none' for c, _ in EVAL_CASES])
def test_eval_bad_input_is_one_line(root, changes, fragment):
  assert fragment in _error(eval_py.command, _eval_argv(root, changes))


CONVERT_CASES = [  # (argv with {root} for the folder of files, a fragment of the message)
    (['--from=timm', '--to=orbax', '--model=mixer_s16', '{root}/tiny.npz', '{root}/new'],
     'tiny.npz is in the npz format, not timm: give --from=npz'),
    (CONVERT[:2] + ['--model=mixer_b61', '{root}/tiny.npz', '{root}/new'], "unknown model 'mixer_b61'"),
    (CONVERT + ['--model_options=depth=2', '{root}/tiny.npz', '{root}/new'], "mixer_s16 has no option 'depth'"),
    (CONVERT + ['--model_options=num_blocks=1.5', '{root}/tiny.npz', '{root}/new'], 'num_blocks=1.5 does not fit'),
    (CONVERT + ['{root}/missing.npz', '{root}/new'], 'missing.npz: no such checkpoint file'),
    (CONVERT + ['{root}/text.npz', '{root}/new'], 'text.npz is a text file'),
    (CONVERT + ['{root}/terabytes.npz', '{root}/new'], 'terabytes.npz: member w.npy claims'),
    (CONVERT + ['{root}/tiny.npz', '{root}/missing/new'], 'missing does not exist'),
    (CONVERT + ['{root}/tiny.npz', '{root}/orbax'], 'output {root}/orbax already exists'),
    (['--from=npz', '--to=npz', '--model=mixer_s16', TINY_OPTIONS, '{root}/tiny.npz', '{root}/out_dir'],
     '--to=npz files are read back by their suffix, .npz'),
    (['--from=npz', '--to=npz', '--model=mixer_s16', TINY_OPTIONS, '{root}/tiny.npz', '{root}/dir.npz'],
     'dir.npz is a directory'),
    (['--from=npz', '--to=timm', '--model=mixer_s16', TINY_OPTIONS, '{root}/tiny.npz', '{root}/t.npz'],
     '--to=timm files are read back by their suffix, .safetensors, .pth'),
    (['--from=orbax', '--to=npz', '--model=convmixer_256_8', '{root}/orbax', '{root}/c.npz'],
     '--to=npz writes Google\'s MLP-Mixer layout, and convmixer_256_8 is a convmixer'),
    (['--from=npz', '--to=orbax', '--model=mixer_b16', '{root}/tiny.npz', '{root}/new'],
     'tiny.npz does not fit mixer_b16'),
    (['--from=npz', '--to=orbax', '--model=davit_tiny', '{root}/tiny.npz', '{root}/new'],
     'tiny.npz: .npz checkpoints are Google\'s MLP-Mixer files; davit_tiny is a davit'),
    (['--from=zip', '--to=orbax', '--model=mixer_s16', '{root}/tiny.npz', '{root}/new'], "argument --from"),
    (['--to=orbax', '--model=mixer_s16', '{root}/tiny.npz', '{root}/new'], 'the following arguments are required'),
]


@pytest.mark.parametrize('argv,fragment', CONVERT_CASES, ids=[' '.join(a[:3] + a[-2:]) for a, _ in CONVERT_CASES])
def test_convert_bad_input_is_one_line(root, argv, fragment):
  message = _error(convert_main.main, [a.format(root=root) for a in argv])
  assert fragment.format(root=root) in message
  assert not os.path.exists(root / 'new')  # nothing written


def test_eval_traceback_flag_shows_the_stack(root):
  with pytest.raises(ValueError, match='text.pth is a text file'):
    eval_py.command(_eval_argv(root, ['--checkpoint={root}/text.pth', '--traceback']))


@pytest.mark.slow
@pytest.mark.parametrize('command', [
    ['eval.py', '--checkpoint={root}/text.pth', '--model=mixer_s16'],
    ['-m', 'mixer_jax.convert', '--from=npz', '--to=orbax', '--model=mixer_s16', '{root}/array.npz', '{root}/new'],
], ids=['eval.py', 'convert'])
def test_commands_print_one_error_line_and_no_traceback(root, command):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
  run = subprocess.run([sys.executable, *[a.format(root=root) for a in command]], cwd=REPO, env=env,
                       capture_output=True, text=True)
  errors = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode == 1 and len(errors) == 1 and 'Traceback' not in run.stderr, run.stderr
  assert ('text.pth is a text file' if command[0] == 'eval.py' else 'array.npz is a single .npy array') in errors[0]
