"""What train.py writes, the other commands read, from any directory and with any spelling of a path.

One quickstart run, trained from a folder of the user's into `~/runs/quickstart/`, is read by eval.py (its own
evaluation, exactly, from other directories and through the workdir's spellings), by convert and predict (the
model from its config.json) and as the `init` of a fine-tuning run given relative paths. eval.py's choice among a
run's evaluations is tested on the choice itself. In-process, as the commands run (train.command, eval.command,
convert's and predict's main), on a small Fashion-MNIST-like dataset. (tests/test_docs.py evaluates the workdir of
every training command of the docs, each family's quickstart among them, the same way.)
"""
import json
import logging
import os
import types

import numpy as np
import pytest
import jax
import tensorflow as tf
from flax import traverse_util

import eval as eval_py
import fake_data
import train
from mixer_jax import convert, inference, models, predict
from mixer_jax.convert import __main__ as convert_main
from mixer_jax.data import fashion_mnist

METRICS = ('top1', 'top5', 'loss', 'count')


def _quickstart(workdir: str, *extra: str) -> dict:
  """The README's quickstart command at 2 steps of batch 8."""
  return train.command(['train.py', '--config=configs/quickstart.py:steps=2,batch_size=8', f'--workdir={workdir}',
                        '--config.schedule.warmup_steps=1', *extra])


@pytest.fixture(scope='module')
def user(tmp_path_factory):
  """(a user's home and working folder, holding ~/runs/quickstart trained from there; the run's final metrics), with
  the Fashion-MNIST the commands find by default (40 train / 20 test images). Tests run inside it."""
  home = tmp_path_factory.mktemp('home')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('HOME', str(home))
    mp.setenv(fashion_mnist.IDX_DIR_ENV, fake_data.fashion_mnist_like(str(home / 'idx'), train=40, test=20))
    mp.setenv('TFDS_DATA_DIR', str(home / 'tfds'))
    mp.chdir(home)
    _quickstart('~/runs/quickstart/')
    with open(home / 'runs' / 'quickstart' / 'metrics.jsonl') as f:
      rows = [json.loads(line) for line in f]
    final = {k: v for row in rows if row['step'] == rows[-1]['step'] for k, v in row.items()}
    yield home, final


@pytest.fixture
def inside(user, monkeypatch):
  home, _ = user
  for key in ('HOME', fashion_mnist.IDX_DIR_ENV, 'TFDS_DATA_DIR'):
    monkeypatch.setenv(key, {'HOME': str(home), fashion_mnist.IDX_DIR_ENV: str(home / 'idx'),
                             'TFDS_DATA_DIR': str(home / 'tfds')}[key])
  monkeypatch.chdir(home)
  return user


@pytest.mark.slow
@pytest.mark.parametrize('cwd,checkpoint', [
    ('elsewhere', '../runs/quickstart'),  # relative, from another directory
    ('/', '~/runs/quickstart/checkpoints'),  # the user's home; the checkpoints folder
    ('runs', '{home}/runs/quickstart/'),  # absolute, trailing slash
])
def test_eval_py_on_a_workdir_gives_the_run_s_final_evaluation(cwd, checkpoint, inside, monkeypatch):
  """No flag but --checkpoint: the run's model, pre-processing, data and batch, hence its numbers exactly."""
  home, final = inside
  (home / 'elsewhere').mkdir(exist_ok=True)
  monkeypatch.chdir(home / cwd)
  results = eval_py.command(['eval.py', f'--checkpoint={checkpoint.format(home=home)}'])
  (name, evaluation), = results['evals'].items()
  assert name == 'test' and evaluation['split'] == 'test' and evaluation['pp'].startswith('decode(channels=1)|')
  assert {k: evaluation[k] for k in METRICS} == {k: final[f'test/{k}'] for k in METRICS}
  assert final['test/count'] == 20


@pytest.mark.slow
def test_eval_py_takes_the_run_s_pre_processing_for_other_splits_and_notes_another_pp(inside, caplog):
  home, final = inside
  caplog.set_level(logging.INFO)
  run_pp = json.load(open(home / 'runs' / 'quickstart' / 'config.json'))['evals']['test']['pp']
  other = eval_py.command(['eval.py', '--checkpoint=runs/quickstart', '--split=test[:10]'])['evals']
  assert list(other) == ['test[:10]'] and other['test[:10]']['count'] == 10 and other['test[:10]']['pp'] == run_pp
  assert "fashion_mnist test[:10] is none of the run's evaluations (test (fashion_mnist test)): evaluating it with " \
         "the pre-processing of 'test'" in caplog.text
  respelt = run_pp.replace('value_range(-1, 1)', 'value_range(-1,1)')  # the same pre-processing, written otherwise
  same = eval_py.command(['eval.py', '--checkpoint=runs/quickstart', f'--pp={respelt}'])['evals']['test']
  assert same['pp'] == respelt and same['loss'] == final['test/loss']
  assert "--pp differs from the pre-processing the run evaluated 'test' with" in caplog.text


def _flags(**given):
  return types.SimpleNamespace(**{**dict(dataset=None, split=None, data_dir=None, batch_size=None, pp=None), **given})


RUN = {'input': {'dataset': 'imagenet2012', 'data_dir': '/data', 'batch_size': 1024},
       'evals': {'minival': {'split': 'train[99%:]', 'pp': 'pp1'}, 'val': {'split': 'validation', 'pp': 'pp1'},
                 'real': {'dataset': 'imagenet2012_real', 'split': 'validation', 'pp': 'pp2', 'batch_size': 64},
                 'fewshot': {'type': 'fewshot', 'dataset': 'cifar100'}}}


@pytest.mark.parametrize('given,chosen', [
    ({}, [('minival', 'imagenet2012', 'train[99%:]', 'pp1', 1024), ('val', 'imagenet2012', 'validation', 'pp1', 1024),
          ('real', 'imagenet2012_real', 'validation', 'pp2', 64)]),  # all the run's classification evaluations
    ({'split': 'validation'}, [('val', 'imagenet2012', 'validation', 'pp1', 1024),
                               ('real', 'imagenet2012_real', 'validation', 'pp2', 64)]),
    ({'dataset': 'imagenet2012_real'}, [('real', 'imagenet2012_real', 'validation', 'pp2', 64)]),
    ({'split': 'validation[:10]', 'batch_size': 8}, [('validation[:10]', 'imagenet2012', 'validation[:10]', 'pp1', 8)]),
    ({'dataset': 'imagenet_v2', 'split': 'test'}, [('test', 'imagenet_v2', 'test', 'pp1', 1024)]),  # the first's pp
    ({'dataset': 'imagenet2012_real', 'split': 'validation[:5]'},
     [('validation[:5]', 'imagenet2012_real', 'validation[:5]', 'pp2', 64)]),  # that dataset's own evaluation's pp
    ({'pp': 'mine'}, [('minival', 'imagenet2012', 'train[99%:]', 'mine', 1024),
                      ('val', 'imagenet2012', 'validation', 'mine', 1024),
                      ('real', 'imagenet2012_real', 'validation', 'mine', 64)]),
])
def test_eval_py_chooses_among_the_run_s_evaluations(given, chosen):
  got = eval_py.evaluations(_flags(**given), RUN)
  assert [(e.name, e.dataset, e.split, e.pp, e.batch_size) for e in got] == chosen
  assert {e.data_dir for e in got} == {'/data'}


@pytest.mark.slow
def test_config_json_names_absolute_paths_and_init_may_be_relative(inside, monkeypatch):
  """Paths are resolved where they enter, so config.json names the same files from anywhere; a fine-tuning run
  finds its relative `init` and image folder, and eval.py finds them again from another directory."""
  home, _ = inside
  photos = home / 'photos'
  for split in ('train', 'test'):
    for c in range(10):
      (photos / split / f'class{c}').mkdir(parents=True)
      (photos / split / f'class{c}' / '0.png').write_bytes(
          tf.io.encode_png(np.full((28, 28, 1), 25 * c, np.uint8)).numpy())
  (home / 'work').mkdir()
  monkeypatch.chdir(home / 'work')
  _quickstart('finetuned/', '--config.init=../runs/quickstart/', '--config.input.dataset=imagefolder:../photos/')
  saved = json.load(open(home / 'work' / 'finetuned' / 'config.json'))
  assert saved['init'] == str(home / 'runs' / 'quickstart')
  assert saved['input']['dataset'] == f'imagefolder:{photos}'
  assert saved['input']['data_dir'] is None  # not given: the default, resolved when read
  monkeypatch.chdir('/')
  results = eval_py.command(['eval.py', f'--checkpoint={home}/work/finetuned/'])
  assert results['evals']['test']['dataset'] == f'imagefolder:{photos}' and results['evals']['test']['count'] == 10


@pytest.mark.slow
def test_convert_and_predict_take_the_run_s_model_from_config_json(inside, capsys):
  """No --model, no options: the quickstart Mixer (patch 7, 128 channels, 1-channel 28x28 images) comes from the
  workdir. The .npz holds the run's parameters exactly, and predict ranks the classes as the model's logits do."""
  home, _ = inside
  (home / 'out').mkdir()
  convert_main.main(['--from=orbax', '--to=npz', 'runs/quickstart/', 'out/quickstart.npz'])
  assert 'wrote out/quickstart.npz (npz): mixer_s16, 282,186 parameters' in capsys.readouterr().out
  _, name, options = inference.spec('runs/quickstart', None, {}, None)
  from_npz = convert.load('out/quickstart.npz', name, **options)
  from_workdir = convert.load('~/runs/quickstart', name, **options)
  assert traverse_util.flatten_dict(from_npz).keys() == traverse_util.flatten_dict(from_workdir).keys()
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_workdir)

  images = []
  for i, example in enumerate(fashion_mnist.builder(os.environ['TFDS_DATA_DIR']).as_dataset(split='test[:3]')):
    (home / f'{i}.png').write_bytes(tf.io.encode_png(example['image']).numpy())
    images.append(example['image'].numpy())
  predict.main(['--checkpoint=runs/quickstart', '--top=3', '--output=out/top3.json', '0.png', '1.png', './2.png'])
  lines = capsys.readouterr().out.splitlines()
  rows = json.load(open(home / 'out' / 'top3.json'))
  model = models.create(name, **options, num_classes=10)
  logits = model.apply(from_workdir, np.stack(images).astype(np.float32) / 127.5 - 1, train=False)[0]
  assert [r['image'] for r in rows] == ['0.png', '1.png', './2.png']
  for i, (line, row) in enumerate(zip(lines, rows)):
    assert [t['class'] for t in row['top']] == list(np.argsort(-logits[i])[:3])
    assert row['top'][0]['name'] in fashion_mnist.CLASS_NAMES
    assert line.startswith(f'{row["image"]}: {row["top"][0]["name"]} {row["top"][0]["score"]:.3f}, ')


@pytest.mark.parametrize('argv,fragment', [
    (['--checkpoint=run', 'missing.png'], 'missing.png: no such image file'),
    (['--checkpoint=run', 'notes.png'], 'notes.png is not an image TensorFlow decodes'),
    (['--checkpoint=run', 'big.png'], "comes out of the pre-processing decode(channels=1)|value_range(-1, 1) as a "
                                      "40x30x1 image, but the model takes 28x28x1: give a --pp that resizes it, e.g. "
                                      "--pp='decode(channels=1)|resize(28)|value_range(-1, 1)'"),
    (['--checkpoint=Mixer-B_16.npz', 'big.png'], 'Mixer-B_16.npz: no such checkpoint file or directory: download '
                                                 'it from gs://mixer_models/imagenet1k/Mixer-B_16.npz or'),
    (['--checkpoint=run', '--model=mixer_b61', 'big.png'], "unknown model 'mixer_b61'"),
    (['--checkpoint=run', '--top=0', 'big.png'], '--top: 0 must be >= 1'),
])
def test_predict_bad_input_is_one_line(argv, fragment, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  variables = models.init_variables(models.create('mixer_s16', num_classes=10, image_size=28, in_channels=1,
                                                  patch_size=7, hidden_dim=8, num_blocks=1), jax.random.key(0))
  convert.save(variables, 'run', 'mixer_s16', 'orbax')
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({
      'model': dict(name='mixer_s16', image_size=28, in_channels=1, patch_size=7, hidden_dim=8, num_blocks=1),
      'input': dict(dataset='fashion_mnist'),
      'evals': dict(test=dict(split='test', pp='decode(channels=1)|value_range(-1, 1)|onehot(10)'))}))
  (tmp_path / 'notes.png').write_text('not an image')
  (tmp_path / 'big.png').write_bytes(tf.io.encode_png(np.zeros((40, 30, 1), np.uint8)).numpy())
  with pytest.raises(SystemExit) as exit_:
    predict.main(argv)
  message = str(exit_.value.code)
  assert message.startswith('error: ') and fragment in message and len(message.strip().splitlines()) == 1
