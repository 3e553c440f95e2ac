"""What train.py writes, the other commands read, from any directory and with any spelling of a path.

eval.py on each family's quickstart workdir gives exactly the run's final evaluation; convert and predict take
the run's model from its config.json; workdirs, checkpoints, image folders, `config.init` and outputs are accepted
relative (from another directory than the run's), with `~` and with trailing slashes. In-process, as the commands
run (train.command, eval.command, convert's and predict's main), on a small Fashion-MNIST-like dataset.
"""
import json
import logging
import os

import numpy as np
import pytest
import jax
import tensorflow as tf
from flax import traverse_util

import eval as eval_py
import fake_data
import train
from configs import quickstart
from mixer_jax import convert, inference, models, predict, trainer
from mixer_jax.convert import __main__ as convert_main
from mixer_jax.data import fashion_mnist


@pytest.fixture
def fashion(tmp_path_factory, monkeypatch):
  """The quickstart's dataset as the commands find it by default (no data_dir flag): 40 train / 20 test images."""
  root = tmp_path_factory.mktemp('fashion')
  monkeypatch.setenv(fashion_mnist.IDX_DIR_ENV, fake_data.fashion_mnist_like(str(root / 'idx'), train=40, test=20))
  monkeypatch.setenv('TFDS_DATA_DIR', str(root / 'tfds'))
  return root


def _quickstart(workdir: str, *extra: str, family: str = 'mixer') -> dict:
  """The README's quickstart command at 2 steps of batch 8."""
  return train.command(['train.py', f'--config=configs/quickstart.py:model={family},steps=2,batch_size=8',
                        f'--workdir={workdir}', '--config.schedule.warmup_steps=1', *extra])


def _final_row(workdir) -> dict:
  """What the run wrote at its last step (each evaluation writes a row)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {k: v for row in rows if row['step'] == rows[-1]['step'] for k, v in row.items()}


@pytest.mark.slow
@pytest.mark.parametrize('family,workdir,checkpoint', [
    ('mixer', 'runs/mixer', '../runs/mixer/'),  # relative to another directory, trailing slash
    ('convmixer', '~/runs/convmixer/', '~/runs/convmixer/checkpoints'),  # the user's home; the checkpoints folder
    ('davit', 'runs/davit', '{tmp}/runs/davit'),  # absolute
])
def test_eval_py_on_a_quickstart_workdir_gives_the_run_s_final_evaluation(family, workdir, checkpoint, tmp_path,
                                                                          fashion, monkeypatch):
  """Run from tmp_path (the recipe is the project's own, found from there), evaluated from tmp_path/elsewhere with
  no flag but --checkpoint: the run's model, pre-processing, data and batch, hence its numbers exactly."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  _quickstart(workdir, family=family)
  final = _final_row(os.path.join(tmp_path, os.path.expanduser(workdir)))
  (tmp_path / 'elsewhere').mkdir()
  monkeypatch.chdir(tmp_path / 'elsewhere')
  results = eval_py.command(['eval.py', f'--checkpoint={checkpoint.format(tmp=tmp_path)}'])
  (name, evaluation), = results['evals'].items()
  assert name == 'test' and evaluation['split'] == 'test' and evaluation['pp'].startswith('decode(channels=1)|')
  assert {k: evaluation[k] for k in ('top1', 'top5', 'loss', 'count')} == {
      k: final[f'test/{k}'] for k in ('top1', 'top5', 'loss', 'count')}
  assert final['test/count'] == 20


@pytest.mark.slow
def test_eval_py_chooses_among_the_run_s_evaluations_or_takes_their_pre_processing(tmp_path, fashion, monkeypatch,
                                                                                    caplog):
  config = quickstart.get_config('steps=2,batch_size=8')
  config.schedule.warmup_steps = 1
  config.evals.train_eval = dict(split='train[:8]', pp=config.input.pp.replace('value_range(-1, 1)',
                                                                               'value_range(-1,1)'))
  trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  final = _final_row(tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  caplog.set_level(logging.INFO)
  both = eval_py.command(['eval.py', '--checkpoint=run'])['evals']
  assert set(both) == {'test', 'train_eval'}
  assert {name: both[name]['top1'] for name in both} == {name: final[f'{name}/top1'] for name in both}
  chosen = eval_py.command(['eval.py', '--checkpoint=run', '--split=train[:8]'])['evals']
  assert list(chosen) == ['train_eval'] and chosen['train_eval']['loss'] == final['train_eval/loss']
  # a split the run never evaluated: the pre-processing of its first evaluation of that dataset, said in the log
  other = eval_py.command(['eval.py', '--checkpoint=run', '--split=test[:10]'])['evals']
  assert list(other) == ['test[:10]'] and other['test[:10]']['count'] == 10
  assert other['test[:10]']['pp'] == both['test']['pp'] == config.input.pp
  assert "fashion_mnist test[:10] is none of the run's evaluations" in caplog.text
  # a --pp of the user's is honoured, with a note (this one is the run's, spelt another way)
  same = eval_py.command(['eval.py', '--checkpoint=run', '--split=test', f'--pp={both["train_eval"]["pp"]}'])
  assert same['evals']['test']['top1'] == final['test/top1']
  assert "--pp differs from the pre-processing the run evaluated 'test' with" in caplog.text


@pytest.mark.slow
def test_config_json_names_absolute_paths_and_init_may_be_relative(tmp_path, fashion, monkeypatch):
  """Paths are resolved where they enter, so config.json names the same files from anywhere; a fine-tuning run
  finds its relative `init` and image folder."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  _quickstart('~/pretrained')
  photos = tmp_path / 'photos'
  for split in ('train', 'test'):
    for c in range(10):
      (photos / split / f'class{c}').mkdir(parents=True)
      (photos / split / f'class{c}' / '0.png').write_bytes(tf.io.encode_png(np.full((28, 28, 1), 25 * c,
                                                                                     np.uint8)).numpy())
  _quickstart('finetuned/', '--config.init=pretrained/', '--config.input.dataset=imagefolder:./photos/')
  saved = json.load(open(tmp_path / 'finetuned' / 'config.json'))
  assert saved['init'] == str(tmp_path / 'pretrained')
  assert saved['input']['dataset'] == f'imagefolder:{photos}'
  assert saved['input']['data_dir'] is None  # not given: the default, resolved when read
  monkeypatch.chdir('/')
  results = eval_py.command(['eval.py', f'--checkpoint={tmp_path}/finetuned'])
  assert results['evals']['test']['dataset'] == f'imagefolder:{photos}' and results['evals']['test']['count'] == 10


@pytest.mark.slow
def test_convert_and_predict_take_the_run_s_model_from_config_json(tmp_path, fashion, monkeypatch, capsys):
  """No --model, no options: the quickstart Mixer (patch 7, 128 channels, 1-channel 28x28 images) comes from the
  workdir. The .npz holds the run's parameters exactly, and predict ranks the classes as the model's logits do."""
  monkeypatch.chdir(tmp_path)
  _quickstart('run')
  (tmp_path / 'out').mkdir()
  convert_main.main(['--from=orbax', '--to=npz', 'run/', 'out/quickstart.npz'])
  assert 'wrote out/quickstart.npz (npz): mixer_s16, 282,186 parameters' in capsys.readouterr().out
  run, name, options = inference.spec('run', None, {}, None)
  from_npz = convert.load('out/quickstart.npz', name, **options)
  from_workdir = convert.load(str(tmp_path / 'run'), name, **options)
  assert traverse_util.flatten_dict(from_npz).keys() == traverse_util.flatten_dict(from_workdir).keys()
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_workdir)

  images = []
  for i, example in enumerate(fashion_mnist.builder(os.environ['TFDS_DATA_DIR']).as_dataset(split='test[:3]')):
    (tmp_path / f'{i}.png').write_bytes(tf.io.encode_png(example['image']).numpy())
    images.append(example['image'].numpy())
  predict.main(['--checkpoint=run', '--top=3', '--output=out/top3.json', '0.png', '1.png', './2.png'])
  lines = capsys.readouterr().out.splitlines()
  rows = json.load(open(tmp_path / 'out' / 'top3.json'))
  model = models.create(name, **options, num_classes=10)
  logits = model.apply(from_workdir, np.stack(images).astype(np.float32) / 127.5 - 1, train=False)[0]
  for i, (line, row) in enumerate(zip(lines, rows)):
    assert [t['class'] for t in row['top']] == list(np.argsort(-logits[i])[:3])
    assert row['top'][0]['name'] in fashion_mnist.CLASS_NAMES and line.startswith(f'{row["image"]}: {row["top"][0]["name"]} ')
  assert [r['image'] for r in rows] == ['0.png', '1.png', './2.png']


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
  message = str(exit_.value.code) if exit_.value.code != 1 else capsys.readouterr().err
  assert fragment in message and len(message.strip().splitlines()) == 1
