"""Pre-trained checkpoints in and out: Google .npz (both layouts), timm/PyTorch files (timm and official key
layouts), safety against code in files, fine-tuning initialisation, the conversion CLI and the weights table."""
import os
import subprocess
import sys

import numpy as np
import pytest
import jax
import torch
from flax import traverse_util

import torch_reference as ref  # before timm: it makes torchvision importable on a CPU-only torch
from timm.models.convmixer import ConvMixer as TimmConvMixer
from timm.models.davit import DaVit as TimmDaVit
from timm.models.mlp_mixer import MlpMixer as TimmMixer
from mixer_jax import convert, models
from mixer_jax.convert import files, npz, pretrained
from mixer_jax.data import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MIXER = dict(patch_size=8, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=32)


def _tiny_mixer(**overrides):
  return models.create('mixer_s16', **{'num_classes': 5, **TINY_MIXER, **overrides})


def _random_variables(model, seed=0):
  """Initialised variables with every array perturbed (Mixer's head starts at zero)."""
  variables = models.init_variables(model, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), variables)


def _logits(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, images))


def _assert_trees_equal(a, b):
  a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


# ----------------------------------------------------------------------------------------------- Google .npz


def _legacy_npz(params, path):
  """The pre-Linen layout: Mixer/encoderblock_{i}/..._phase_0/{kernel,bias}{1,2} with extra singleton dims."""
  flat = {}
  for key, value in traverse_util.flatten_dict(params, sep='/').items():
    if key.startswith('MixerBlock_'):
      block, rest = key.split('/', 1)
      i = block.split('_')[1]
      if '_mixing/' in rest:
        kind, dense, leaf = rest.split('/')
        number = '1' if dense == 'Dense_0' else '2'
        key, value = f'Mixer/encoderblock_{i}/{kind}_phase_0/{leaf}{number}', value[None]
      else:
        key = f'Mixer/encoderblock_{i}/{rest}'
    elif key.startswith('stem/'):
      key = key.replace('stem/', 'embedding/')
    elif key.startswith('pre_head_layer_norm/'):
      key = key.replace('pre_head_layer_norm/', 'Mixer/encoder_norm/')
    flat[key] = value
  np.savez(path, **flat)


@pytest.mark.parametrize('layout', ['standard', 'legacy', 'opt/target'])
def test_npz_layouts_load_back_equal(tmp_path, layout):
  model = _tiny_mixer()
  variables = _random_variables(model)
  path = str(tmp_path / 'Mixer-T_8.npz')
  if layout == 'standard':
    npz.write(variables['params'], path)
  elif layout == 'legacy':
    _legacy_npz(variables['params'], path)
  else:
    np.savez(path, **{f'opt/target/{k}': v for k, v in traverse_util.flatten_dict(variables['params'],
                                                                                  sep='/').items()})
  loaded = convert.load(path, 'mixer_s16', **{k: v for k, v in TINY_MIXER.items() if k != 'image_size'})
  _assert_trees_equal(loaded, variables)
  images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(_logits(model, loaded, images), _logits(model, variables, images))


def test_npz_export_has_googles_keys_and_float32(tmp_path):
  variables = _random_variables(_tiny_mixer())
  path = str(tmp_path / 'out.npz')
  convert.save(variables, path, 'mixer_s16', 'npz')
  with np.load(path) as archive:
    assert set(archive.files) == set(traverse_util.flatten_dict(variables['params'], sep='/'))
    assert {archive[k].dtype for k in archive.files} == {np.dtype('float32')}


def test_npz_at_the_wrong_resolution_names_every_bad_key(tmp_path):
  path = str(tmp_path / 'm.npz')
  npz.write(_random_variables(_tiny_mixer())['params'], path)
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  with pytest.raises(ValueError) as error:
    convert.load(path, 'mixer_s16', image_size=64, **options)
  message = str(error.value)
  assert message.startswith('m.npz does not fit mixer_s16 (num_classes=5, image_size=64): 6 with the wrong shape')
  for i in range(2):
    assert f'MixerBlock_{i}/token_mixing/Dense_0/kernel (16, 8) (expected (64, 8))' in message
    assert f'MixerBlock_{i}/token_mixing/Dense_1/bias (16,) (expected (64,))' in message


# ---------------------------------------------------------------------------------------- timm / PyTorch files

FAMILIES = {  # our model name + options, the same architecture in timm, and a resolution
    'mixer': ('mixer_s16', dict(TINY_MIXER, act='gelu', channels_mlp_dim=64),  # timm: D_C = 4C
              lambda: TimmMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=16), 32),
    'convmixer': ('convmixer_256_8', dict(dim=16, depth=2, kernel_size=3, patch_size=4),
                  lambda: TimmConvMixer(dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=5), 32),
    'davit': ('davit_tiny', dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
              lambda: TimmDaVit(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1),
                                num_classes=5), 38),
}


def _official_layout(family, state_dict):
  """timm keys -> the official releases' keys (locuslab ConvMixer nn.Sequential, dingmyu/davit)."""
  out = {}
  depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.')) if family == 'convmixer' else 0
  for key, value in state_dict.items():
    if family == 'convmixer':
      key = (key.replace('stem.0.', '0.').replace('stem.2.', '2.').replace('head.', f'{depth + 5}.'))
      if key.startswith('blocks.'):
        _, i, rest = key.split('.', 2)
        key = f'{3 + int(i)}.{rest}'
    else:
      key = (key.replace('stem.conv', 'patch_embeds.0.proj').replace('stem.norm', 'patch_embeds.0.norm')
             .replace('head.fc.', 'head.').replace('head.norm.', 'norms.').replace('cpe1', 'cpe.0')
             .replace('cpe2', 'cpe.1'))
      for s in range(4):
        key = key.replace(f'stages.{s}.downsample.conv', f'patch_embeds.{s}.proj')
        key = key.replace(f'stages.{s}.downsample.norm', f'patch_embeds.{s}.norm')
        key = key.replace(f'stages.{s}.blocks', f'main_blocks.{s}')
    out[key] = value
  return out


KINDS = ['safetensors', 'pth', 'pth.tar (state_dict, module.)', 'official']


# MLP-Mixer has no official PyTorch release (Google publishes .npz): its 'official' case does not exist.
# DaViT's cases compile its model (5-8 s each on 2 cores): make test only; test_convert_timm.py keeps one in make
# test-fast.
@pytest.mark.parametrize('family,kind', [
    pytest.param(f, k, marks=pytest.mark.slow if f == 'davit' else ())
    for f in FAMILIES for k in KINDS if (f, k) != ('mixer', 'official')])
def test_pytorch_files_match_timm_logits(tmp_path, family, kind):
  name, options, timm_model, res = FAMILIES[family]
  module = ref.create(timm_model, calibration_size=res)
  state_dict = module.state_dict()
  if kind == 'safetensors':
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
  elif kind == 'pth':
    path = tmp_path / 'w.pth'
    torch.save(state_dict, path)
  elif kind == 'official':
    path = tmp_path / 'official.pth'
    torch.save(_official_layout(family, state_dict), path)
  else:
    path = tmp_path / 'w.pth.tar'
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path)
  variables = convert.load(str(path), name, **options)
  model = models.create(name, num_classes=5, **{**options, 'image_size': res})
  images = np.random.default_rng(1).standard_normal((2, res, res, 3)).astype(np.float32)
  np.testing.assert_allclose(_logits(model, variables, images), ref.logits(module, images), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- safety


class _Payload:
  """What a malicious checkpoint would carry: unpickling it calls os.system."""

  def __reduce__(self):
    return (os.system, ('echo pwned > /dev/null',))


def test_files_needing_pickle_are_refused(tmp_path):
  torch.save({'weight': torch.zeros(2), 'extra': _Payload()}, tmp_path / 'evil.pth')
  with pytest.raises(ValueError, match=r'^refusing .*evil.pth: it needs pickled Python objects beyond tensors'):
    files.read_state_dict(str(tmp_path / 'evil.pth'))
  np.savez(tmp_path / 'evil.npz', w=np.zeros(2), obj=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match=r'^refusing .*evil.npz: it holds pickled Python objects'):
    npz.read(str(tmp_path / 'evil.npz'))


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors', '.pth'])
def test_truncated_files_give_one_line_naming_the_file(tmp_path, suffix):
  source = tmp_path / f'good{suffix}'
  state = {'head.bias': np.zeros(4, np.float32), 'head.weight': np.ones((4, 3), np.float32)}
  if suffix == '.npz':
    np.savez(source, **state)
  elif suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file(state, str(source))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, source)
  broken = tmp_path / f'broken{suffix}'
  broken.write_bytes(source.read_bytes()[:len(source.read_bytes()) // 2])
  with pytest.raises(ValueError) as error:
    convert.load(str(broken), 'mixer_s16' if suffix == '.npz' else 'convmixer_256_8')
  assert str(broken) in str(error.value) and '\n' not in str(error.value)
  assert 'truncated or corrupt' in str(error.value)


# ------------------------------------------------------------------------------------------- fine-tune init


def test_finetune_init_reinitialises_only_a_head_of_another_size(tmp_path):
  source = _tiny_mixer(num_classes=7)
  variables = _random_variables(source)
  path = str(tmp_path / 'pre.npz')
  npz.write(variables['params'], path)
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  loaded, overrides, notes = convert.load_for_finetuning(path, 'mixer_s16', options, image_size=32)
  assert overrides == {'tokens_mlp_dim': 8} and notes == []
  target = _tiny_mixer(num_classes=3)
  fresh = models.init_variables(target, jax.random.key(5))
  merged, report = convert.merge(loaded, fresh)
  flat_merged, flat_source = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(variables)
  for key, value in flat_merged.items():
    if key[1] == 'head':
      assert value.shape[-1] == 3 and not value.any()  # vit_jax: a fresh head starts at zero
    else:
      np.testing.assert_array_equal(value, flat_source[key])
  assert report == 'loaded 28 arrays; re-initialised (zeros): head/bias, head/kernel; left out: none'


@pytest.mark.slow
@pytest.mark.parametrize('keep_head', [False, True])
def test_finetune_init_replaces_a_head_of_the_same_size_unless_kept(tmp_path, keep_head):
  """vit_jax: fine-tuning starts from a zero head even when the classes match (ImageNet from an ImageNet
  checkpoint); keep_head keeps the pre-trained one."""
  variables = _random_variables(_tiny_mixer())
  path = str(tmp_path / 'pre.npz')
  npz.write(variables['params'], path)
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  loaded, _, _ = convert.load_for_finetuning(path, 'mixer_s16', options, image_size=32)
  merged, report = convert.merge(loaded, models.init_variables(_tiny_mixer(), jax.random.key(5)),
                                 keep_head=keep_head)
  head, source = merged['params']['head']['kernel'], variables['params']['head']['kernel']
  assert np.array_equal(head, source) if keep_head else not head.any()
  assert report.startswith(f'loaded {30 if keep_head else 28} arrays')


def test_finetune_init_at_twice_the_resolution_expands_token_mixing(tmp_path):
  path = str(tmp_path / 'pre.npz')
  npz.write(_random_variables(_tiny_mixer())['params'], path)
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  loaded, overrides, notes = convert.load_for_finetuning(path, 'mixer_s16', options, image_size=64)
  assert overrides == {'tokens_mlp_dim': 32} and '4x4 -> 8x8' in notes[0]
  target = _tiny_mixer(image_size=64, tokens_mlp_dim=32)
  merged, _ = convert.merge(loaded, models.init_variables(target, jax.random.key(0)))
  assert merged['params']['MixerBlock_0']['token_mixing']['Dense_0']['kernel'].shape == (64, 32)


def test_finetune_init_refuses_another_architecture(tmp_path):
  path = str(tmp_path / 'pre.npz')
  npz.write(_random_variables(_tiny_mixer())['params'], path)
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  loaded, _, _ = convert.load_for_finetuning(path, 'mixer_s16', options, image_size=32)
  wider = _tiny_mixer(hidden_dim=24)
  with pytest.raises(ValueError, match=r'does not fit the model: params/MixerBlock_0/LayerNorm_0/bias \(16,\) '
                                       r'\(expected \(24,\)\)'):
    convert.merge(loaded, models.abstract_variables(wider))


@pytest.mark.slow
def test_run_fine_tunes_from_an_orbax_workdir(tmp_path):
  """A converted orbax checkpoint initialises a training run through config.init."""
  from configs import finetune
  from mixer_jax import trainer
  import tensorflow as tf
  root = tmp_path / 'photos'
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in range(3):
      (root / split / f'class{c}').mkdir(parents=True)
      for i in range(8):
        pixels = np.full((32, 32, 3), 60 * c, np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
        (root / split / f'class{c}' / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())
  source = _random_variables(_tiny_mixer())
  convert.save(source, str(tmp_path / 'pre'), 'mixer_s16', 'orbax')
  config = finetune.get_config(f'model=mixer_s16,dataset=imagefolder:{root},res=32,steps=2,batch_size=8,'
                               f'init={tmp_path / "pre"}')
  config.model.update({k: v for k, v in TINY_MIXER.items() if k != 'image_size'}, dtype='float32')
  config.schedule.warmup_steps = 1
  metrics = trainer.train_and_evaluate(config, str(tmp_path / 'workdir'), devices=jax.devices()[:1])
  assert metrics['step'] == 2 and metrics['test/count'] == 24


@pytest.mark.slow
def test_converters_see_the_per_block_layout_of_scanned_models(tmp_path):
  """scan_blocks=True changes nothing a converter returns: Google's .npz, timm files and a scanned run's orbax
  checkpoint all load per block, `models.stack_blocks` turns them into the scanned model's variables (the per-block
  model's logits), exports of stacked variables hold the per-block layout, and the fine-tuning merge works per
  block."""
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  mixer = _random_variables(_tiny_mixer())
  npz.write(mixer['params'], tmp_path / 'mixer.npz')
  options = {k: v for k, v in TINY_MIXER.items() if k != 'image_size'}
  loaded = convert.load(str(tmp_path / 'mixer.npz'), 'mixer_s16', scan_blocks=True, **options)
  _assert_trees_equal(loaded, mixer)
  scanned = _tiny_mixer(scan_blocks=True)
  stacked = models.stack_blocks(loaded, scanned)
  assert stacked['params']['MixerBlock']['LayerNorm_0']['scale'].shape == (2, 16)
  np.testing.assert_allclose(_logits(scanned, stacked, images), _logits(_tiny_mixer(), mixer, images),
                             rtol=1e-5, atol=1e-6)
  convert.save(stacked, str(tmp_path / 'out.npz'), 'mixer_s16', 'npz')
  _assert_trees_equal(npz.read(str(tmp_path / 'out.npz')), mixer['params'])
  files.write_orbax(stacked, str(tmp_path / 'run'))  # what a scanned training run's checkpoint holds
  _assert_trees_equal(convert.load(str(tmp_path / 'run'), 'mixer_s16', **options), mixer)
  initial, _, _ = convert.load_for_finetuning(str(tmp_path / 'mixer.npz'), 'mixer_s16',
                                              {**options, 'scan_blocks': True}, image_size=64)  # resized
  target = _tiny_mixer(image_size=64, tokens_mlp_dim=32, scan_blocks=True)
  merged, _ = convert.merge(initial, models.abstract_variables(models.per_block(target)))
  assert jax.tree.map(np.shape, models.stack_blocks(merged, target)) == jax.tree.map(
      np.shape, models.abstract_variables(target))

  convmixer = models.create('convmixer_256_8', num_classes=5, dim=16, depth=3, kernel_size=3, image_size=32)
  variables = _random_variables(convmixer)
  convert.save(variables, str(tmp_path / 'convmixer.safetensors'), 'convmixer_256_8', 'timm')
  loaded = convert.load(str(tmp_path / 'convmixer.safetensors'), 'convmixer_256_8', dim=16, depth=3,
                        kernel_size=3, scan_blocks=True)
  stacked = models.stack_blocks(loaded, convmixer.clone(scan_blocks=True))
  assert stacked['batch_stats']['ConvMixerBlock']['pointwise_norm']['var'].shape == (3, 16)
  np.testing.assert_allclose(_logits(convmixer.clone(scan_blocks=True), stacked, images),
                             _logits(convmixer, variables, images), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- CLI and the table


@pytest.mark.slow
def test_convert_cli_round_trips_npz_timm_orbax(tmp_path):
  variables = _random_variables(_tiny_mixer())
  npz.write(variables['params'], tmp_path / 'a.npz')
  options = '--model_options=' + ','.join(f'{k}={v}' for k, v in TINY_MIXER.items() if k != 'image_size')
  steps = [('npz', 'timm', 'a.npz', 'b.safetensors'), ('timm', 'orbax', 'b.safetensors', 'c'),
           ('orbax', 'npz', 'c', 'd.npz')]
  for source, target, given, written in steps:
    run = subprocess.run([sys.executable, '-m', 'mixer_jax.convert', f'--from={source}', f'--to={target}',
                          '--model=mixer_s16', options, str(tmp_path / given), str(tmp_path / written)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f'wrote {tmp_path / written} ({target}): mixer_s16' in run.stdout
  _assert_trees_equal(npz.read(str(tmp_path / 'd.npz')), variables['params'])
  bad = subprocess.run([sys.executable, '-m', 'mixer_jax.convert', '--from=timm', '--to=orbax', '--model=mixer_s16',
                        str(tmp_path / 'a.npz'), str(tmp_path / 'x')], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "a.npz"} is in the npz format, not timm: give --from=npz')


def test_pretrained_table_entries_are_usable():
  for name, entry in pretrained.CHECKPOINTS.items():
    models.create(entry.model, num_classes=entry.num_classes, **dict(entry.options))  # its options exist
    assert models.family(entry.model) == entry.eval_family or entry.image_pp, name
    assert entry.url.startswith(('gs://mixer_models/', 'https://huggingface.co/')) and entry.licence
    if entry.image_pp:
      ops.parse(entry.image_pp)
  with pytest.raises(ValueError, match='unknown pre-trained checkpoint'):
    pretrained.get('mixer_z9')
