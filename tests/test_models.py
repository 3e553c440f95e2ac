"""Model registry, parameter counts, shapes, parameter trees and options (no full-size compile)."""
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from mixer_jax import models
from mixer_jax.models import davit, layers

# Published parameter counts with a 1000-class head at 224 (vit_jax's models_test.py, timm's model cards).
PUBLISHED_PARAMS = {
    'mixer_s32': 19_104_624, 'mixer_s16': 18_528_264, 'mixer_s8': 20_646_504, 'mixer_b32': 60_293_428,
    'mixer_b16': 59_880_472, 'mixer_l32': 206_939_264, 'mixer_l16': 208_196_168, 'mixer_h14': 432_350_952,
    'convmixer_1536_20': 51_625_960, 'convmixer_768_32': 21_110_248, 'convmixer_1024_20_p14': 24_383_464,
    'davit_tiny': 28_360_168, 'davit_small': 49_745_896, 'davit_base': 87_954_408, 'davit_large': 196_811_752,
    'davit_huge': 348_922_856, 'davit_giant': 1_406_470_120,
}
WIDTH = {'mixer_s': 512, 'mixer_b': 768, 'mixer_l': 1024, 'mixer_h': 1280, 'convmixer_1536': 1536,
         'convmixer_768': 768, 'convmixer_1024': 1024, 'convmixer_256': 256, 'davit_tiny': 768,
         'davit_small': 768, 'davit_base': 1024, 'davit_large': 1536, 'davit_huge': 2048, 'davit_giant': 3072}

# make test-fast checks a few small variants of each family; tracing each large one takes 2-8 s on 2 cores.
SMALL = ('mixer_s32', 'mixer_s16', 'mixer_b32', 'mixer_b16', 'convmixer_256_8', 'davit_tiny')


def by_size(names):
  return [pytest.param(n, marks=() if n in SMALL else pytest.mark.slow) for n in names]


def test_every_variant_is_registered():
  assert set(models.names()) == set(PUBLISHED_PARAMS) | {'convmixer_256_8'}


@pytest.mark.parametrize('name', by_size(sorted(PUBLISHED_PARAMS)))
def test_parameter_count_matches_published(name):
  variables = models.abstract_variables(models.create(name, num_classes=1000))
  assert models.count_params(variables['params']) == PUBLISHED_PARAMS[name]


def test_convmixer_cifar_parameter_count():
  variables = models.abstract_variables(models.create('convmixer_256_8', num_classes=10))
  assert models.count_params(variables['params']) == 594_186


@pytest.mark.parametrize('name', by_size(models.names()))
def test_output_shapes(name):
  model = models.create(name, num_classes=1000)
  size = 32 if name == 'convmixer_256_8' else 224
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  logits, out = jax.eval_shape(lambda v, x: model.apply(v, x), models.abstract_variables(model), images)
  width = next(w for prefix, w in WIDTH.items() if name.startswith(prefix))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert out['pre_logits'].shape == (2, width) and out['pre_logits'].dtype == jnp.float32


def test_mixer_b16_tree_is_googles_npz_layout():
  """Every key and shape of gs://mixer_models/*/Mixer-B_16.npz (as listed by np.load), and nothing else."""
  expected = {'stem/kernel': (16, 16, 3, 768), 'stem/bias': (768,), 'pre_head_layer_norm/scale': (768,),
              'pre_head_layer_norm/bias': (768,), 'head/kernel': (768, 1000), 'head/bias': (1000,)}
  for i in range(12):
    b = f'MixerBlock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      expected[f'{b}/{ln}/scale'] = expected[f'{b}/{ln}/bias'] = (768,)
    expected.update({f'{b}/token_mixing/Dense_0/kernel': (196, 384), f'{b}/token_mixing/Dense_0/bias': (384,),
                     f'{b}/token_mixing/Dense_1/kernel': (384, 196), f'{b}/token_mixing/Dense_1/bias': (196,),
                     f'{b}/channel_mixing/Dense_0/kernel': (768, 3072),
                     f'{b}/channel_mixing/Dense_0/bias': (3072,),
                     f'{b}/channel_mixing/Dense_1/kernel': (3072, 768),
                     f'{b}/channel_mixing/Dense_1/bias': (768,)})
  params = models.abstract_variables(models.create('mixer_b16', num_classes=1000))['params']
  got = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  assert len(expected) == 150 and got == expected


@pytest.mark.parametrize('name', ['mixer_b16', pytest.param('convmixer_768_32', marks=pytest.mark.slow), 'davit_tiny'])
def test_every_parameter_has_logical_axis_names(name):
  model = models.create(name, num_classes=1000)
  specs = traverse_util.flatten_dict(models.logical_axes(model)['params'])
  shapes = traverse_util.flatten_dict(models.abstract_variables(model)['params'])
  assert specs.keys() == shapes.keys()
  for path, spec in specs.items():
    assert len(spec) == len(shapes[path].shape) and all(isinstance(a, str) for a in spec), (path, spec)


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown model 'mixer_x16'.*mixer_b16.*convmixer_768_32.*davit_tiny"):
    models.create('mixer_x16', num_classes=10)


def test_unknown_option_lists_options():
  with pytest.raises(ValueError, match=r"davit_tiny has no option 'stoch_depth'; options: .*drop_path_rate"):
    models.create('davit_tiny', num_classes=10, stoch_depth=0.1)


def test_mixer_image_size_not_divisible_by_patch():
  model = models.create('mixer_b16', num_classes=10, image_size=225)
  with pytest.raises(ValueError, match=r'image size 225x225 is not divisible by the Mixer patch size 16'):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 225, 225, 3), jnp.float32))


def test_mixer_other_resolution_than_built_for():
  model = models.create('mixer_b16', num_classes=10)
  variables = models.abstract_variables(model)
  with pytest.raises(ValueError, match=r'built for 224x224 images \(196 tokens\) but got 448x448 \(784 tokens\)'):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32))


@functools.lru_cache
def _init(name):
  """Variables of `_tiny(name)`; options that create no parameters (dtype, drop rates) can share them."""
  return models.init_variables(_tiny(name), jax.random.key(0))


def _tiny(name, **overrides):
  """Small members of each family, for tests that run real computations."""
  kwargs = {
      'mixer': dict(patch_size=4, hidden_dim=32, num_blocks=3, tokens_mlp_dim=16, channels_mlp_dim=64,
                    image_size=16),
      'convmixer': dict(dim=32, depth=2, kernel_size=3, patch_size=2, image_size=16),
      'davit': dict(dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), image_size=16),
  }[models.family(name)]
  return models.create(name, num_classes=5, **{**kwargs, **overrides})


@pytest.mark.parametrize('name', ['mixer_s32', *(pytest.param(n, marks=pytest.mark.slow)
                                                for n in ('convmixer_256_8', 'davit_tiny'))])
def test_bfloat16_compute_keeps_float32_params_and_outputs(name):
  f32 = _tiny(name)
  bf16 = _tiny(name, dtype='bfloat16')
  variables = _init(name)
  assert {x.dtype for x in jax.tree.leaves(models.abstract_variables(bf16))} == {np.dtype('float32')}
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  want, _ = jax.jit(f32.apply)(variables, images)
  got, out = jax.jit(bf16.apply)(variables, images)
  assert got.dtype == out['pre_logits'].dtype == jnp.float32
  assert np.allclose(got, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-3)


@pytest.mark.slow
def test_davit_runs_at_sizes_that_are_not_window_or_stride_multiples():
  model = _tiny('davit_tiny')
  variables = _init('davit_tiny')
  for h, w in [(16, 16), (23, 37), (9, 5)]:
    logits, out = jax.jit(model.apply)(variables, jax.random.normal(jax.random.key(1), (2, h, w, 3)))
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    assert out['stage_0'].shape[1:3] == (-(-h // 4), -(-w // 4))


def test_convmixer_floors_the_patch_grid_as_timm():
  """At a size the patch does not divide, timm's stride-p VALID stem drops the bottom and right remainder pixels;
  both depthwise forms must give timm's logits there, and an image smaller than one patch is refused."""
  import torch_reference as ref  # torch and timm are imported for this test only, not for the whole file
  from timm.models.convmixer import ConvMixer as TimmConvMixer
  from mixer_jax import convert
  options = dict(dim=16, depth=2, kernel_size=3, patch_size=4)
  timm_model = ref.create(TimmConvMixer, calibration_size=30, num_classes=5, **options)
  images = np.random.default_rng(1).standard_normal((2, 29, 33, 3)).astype(np.float32)
  want = ref.logits(timm_model, images)
  variables = convert.from_timm('convmixer_256_8', timm_model.state_dict(), **options)
  for depthwise in layers.DEPTHWISE_IMPLS:
    model = models.create('convmixer_256_8', num_classes=5, depthwise=depthwise, **options)
    got, out = jax.jit(model.apply)(variables, images)
    assert out['stem'].shape[1:3] == (7, 8)
    assert want.std() > 0.05 and np.abs(np.asarray(got) - want).max() < 1e-4, depthwise
  with pytest.raises(ValueError, match=r'image size 3x33 is smaller than one ConvMixer patch \(4x4\)'):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 3, 33, 3), jnp.float32))


def test_convmixer_batch_stats_follow_torch_momentum():
  """Training moves the running statistics 10% of the way to the batch statistics (torch momentum 0.1, biased
  variance as flax computes it); evaluation leaves them alone."""
  model = _tiny('convmixer_256_8')
  variables = _init('convmixer_256_8')
  images = 3.0 + jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  _, updated = model.apply(variables, images, train=True, mutable=['batch_stats'])
  stem = variables['params']['stem']
  y = jax.lax.conv_general_dilated(images, stem['kernel'], (2, 2), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + stem['bias']
  y = jax.nn.gelu(y, approximate=False)
  stats = updated['batch_stats']['stem_norm']
  np.testing.assert_allclose(stats['mean'], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * y.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  _, unchanged = model.apply(variables, images, train=False, mutable=['batch_stats'])
  assert jax.tree.all(jax.tree.map(np.array_equal, unchanged['batch_stats'], variables['batch_stats']))


def test_convmixer_group_batch_norm_matches_per_group_torch():
  """bn_group_size=4 on a batch of 8 is PyTorch DDP on two GPUs of 4 images: timm's ConvMixer trained on each
  group alone gives our logits for it, and our running statistics are the mean of the two replicas' (timm's
  --dist-bn reduce, unbiased variances included). A group size that does not divide the batch is refused."""
  import copy
  import torch
  import torch_reference as ref  # torch and timm are imported for this test only, not for the whole file
  from timm.models.convmixer import ConvMixer as TimmConvMixer
  from mixer_jax import convert
  options = dict(dim=8, depth=1, kernel_size=3, patch_size=2)
  timm_model = ref.create(TimmConvMixer, calibration_size=16, num_classes=5, **options)
  images = 1.0 + np.random.default_rng(1).standard_normal((8, 16, 16, 3)).astype(np.float32)
  want, replicas = [], []
  for group in (images[:4], images[4:]):
    replica = copy.deepcopy(timm_model).train()
    with torch.no_grad():
      want.append(replica(torch.from_numpy(group.transpose(0, 3, 1, 2).copy())).numpy())
    replicas.append(convert.from_timm('convmixer_256_8', replica.state_dict(), **options)['batch_stats'])
  model = models.create('convmixer_256_8', num_classes=5, bn_group_size=4, **options)
  variables = convert.from_timm('convmixer_256_8', timm_model.state_dict(), **options)
  (got, _), updated = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(variables, images)
  np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-5)
  reduced = jax.tree.map(lambda a, b: (a + b) / 2, *replicas)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), updated['batch_stats'], reduced)
  with pytest.raises(ValueError, match=r'^bn_group_size=4 does not divide the batch of 6 examples'):
    jax.eval_shape(functools.partial(model.apply, train=True, mutable=['batch_stats']), variables,
                   jax.ShapeDtypeStruct((6, 16, 16, 3), jnp.float32))


def test_group_batch_norm_straddling_devices_moves_statistics_not_activations():
  """Groups of 4 over 8 devices of 6 examples: only per-example channel means cross devices (48 x 16 values
  gathered per statistic), not the (48, 8, 8, 16) activations."""
  from mixer_jax import hlo, sharding
  batch_sh = sharding.batch_sharding(sharding.make_mesh((8, 1, 1)))
  bn = layers.batch_norm(train=True, param_dtype=jnp.float32, group_size=4)
  x = jax.ShapeDtypeStruct((48, 8, 8, 16), jnp.float32)
  variables = jax.eval_shape(bn.init, jax.random.PRNGKey(0), x)
  step = jax.jit(lambda v, x: bn.apply(v, x, mutable=['batch_stats']), in_shardings=(None, batch_sh))
  moved = hlo.collectives(step.lower(variables, x).compile().as_text())
  assert sum(c['bytes'] for c in moved.values()) <= 4 * 48 * 16 * 4  # two statistics' (B, C) gathers, a reduce


def test_drop_path_scaling_conventions():
  x = jnp.ones((4000, 3))
  module = layers.MlpBlock(4, ('embed', 'mlp'), 'relu', jnp.float32, jnp.float32)  # any module with an rng
  for scale_by_keep, kept_value in ((False, 1.0), (True, 1.0 / 0.75)):
    y = module.apply({}, x, method=lambda m, x: layers.drop_path(x, 0.25, train=True, module=m,
                                                                 scale_by_keep=scale_by_keep),
                     rngs={'dropout': jax.random.key(0)})
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, kept_value], rtol=1e-6)
    assert abs(float((y[:, 0] == 0).mean()) - 0.25) < 0.03
    assert np.all(y[:, :1] == y)  # one decision per example
  assert layers.drop_path(x, 0.25, train=False, module=None, scale_by_keep=True) is x


def test_mixer_stochastic_depth_schedule():
  """big_vision: block i drops with p = i/(L-1) * stoch_depth: never the first, always the last at rate 1."""
  model = _tiny('mixer_s32', stoch_depth=1.0)
  variables = _init('mixer_s32')
  images = jax.random.normal(jax.random.key(1), (6, 16, 16, 3))
  _, train = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)}))(
      variables, images)
  _, det = jax.jit(model.apply)(variables, images)
  np.testing.assert_array_equal(train['block_0'], det['block_0'])
  np.testing.assert_array_equal(train['block_2'], train['block_1'])


@pytest.mark.slow
def test_davit_official_drop_path_schedule():
  rates = davit.drop_path_rates((1, 1, 3, 1), 0.1)
  assert len(rates) == 12 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
  assert rates[1] == pytest.approx(0.1 / 11)  # the channel block of the first pair already drops
  model = _tiny('davit_tiny', drop_path_rate=0.5)
  variables = _init('davit_tiny')
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={'dropout': key})[0])
  a, b = train(variables, images, jax.random.key(2)), train(variables, images, jax.random.key(3))
  c, d = jax.jit(model.apply)(variables, images)[0], jax.jit(model.apply)(variables, images)[0]
  assert not np.allclose(a, b) and np.array_equal(c, d)


def test_depthwise_form_follows_the_platform_the_model_is_built_for():
  """'auto' (or unset) is the form for the target hardware, not for the machine that builds the program: a TPU
  program compiled on this CPU gets XLA's grouped convolution (BENCHMARKS.md, TPU: tuning)."""
  assert models.create('convmixer_768_32', num_classes=10).depthwise == 'shift'  # this machine: a CPU
  assert models.create('convmixer_768_32', num_classes=10, platform='tpu').depthwise == 'conv'
  assert models.create('davit_tiny', num_classes=10, platform='gpu', depthwise='auto').depthwise == 'conv'
  assert models.create('davit_tiny', num_classes=10, platform='tpu', depthwise='shift').depthwise == 'shift'
  with pytest.raises(ValueError, match="depthwise 'fast': choose 'conv', 'shift'"):
    layers.DepthwiseConv(3, jnp.float32, jnp.float32, impl='fast').init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


@pytest.mark.parametrize('kernel_size', [3, 4, 7])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_depthwise_shift_and_add_equals_grouped_convolution(kernel_size, dtype):
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 8))
  conv = layers.DepthwiseConv(kernel_size, jnp.dtype(dtype), jnp.float32, impl='conv')
  shift = layers.DepthwiseConv(kernel_size, jnp.dtype(dtype), jnp.float32, impl='shift')
  variables = nn.meta.unbox(conv.init(jax.random.key(1), x))
  want, got = conv.apply(variables, x), shift.apply(variables, x)
  assert got.dtype == want.dtype == jnp.dtype(dtype)
  tol = 1e-5 if dtype == 'float32' else 3e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
  # the parameters are those of flax's grouped nn.Conv, so either implementation loads the same checkpoints
  reference = jax.eval_shape(lambda: nn.meta.unbox(nn.Conv(8, (kernel_size,) * 2, feature_group_count=8).init(
      jax.random.key(1), x)))
  assert jax.tree.map(lambda a: a.shape, reference) == jax.tree.map(lambda a: a.shape, variables)


def _train_loss_grads_stats(model, variables, images):
  """sum(logits^2), its gradients and the updated BatchNorm statistics, in training mode (drop path on)."""
  def loss(params):
    (logits, _), updated = model.apply({**variables, 'params': params}, images, train=True,
                                       mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
    return jnp.sum(logits ** 2), updated
  (value, updated), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, grads, updated


# make test-fast keeps the Mixer's 'dots'; DaViT's case compiles its training step twice (20-40 s each on 2 cores):
# make test only. Full remat wraps DaViT's blocks as it wraps the others': its policy with batched dots is the case.
@pytest.mark.parametrize('name,policy', [pytest.param('mixer_s32', True, marks=pytest.mark.slow),
                                         pytest.param('convmixer_256_8', True, marks=pytest.mark.slow),
                                         ('mixer_s32', 'dots'),
                                         pytest.param('davit_tiny', 'dots_no_batch', marks=pytest.mark.slow)])
def test_remat_changes_memory_not_results(name, policy):
  """Rematerialised blocks, whatever the policy, give the same parameter tree, logits and gradients (training
  mode, with BatchNorm updates and drop path)."""
  # DaViT in two stages: its blocks are the same in every stage, and each stage adds to the two compiles
  small = dict(dims=(32, 64), depths=(1, 1), num_heads=(1, 2)) if models.family(name) == 'davit' else {}
  plain, remat = _tiny(name, **small), _tiny(name, remat=policy, **small)
  variables = models.init_variables(plain, jax.random.key(0))
  assert jax.tree.structure(models.abstract_variables(remat)) == jax.tree.structure(variables)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  want, got = _train_loss_grads_stats(plain, variables, images), _train_loss_grads_stats(remat, variables, images)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # without drop path, training needs no 'dropout' RNG, rematerialised or not
  remat.apply(variables, images, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('name', ['mixer_s32', pytest.param('convmixer_256_8', marks=pytest.mark.slow)])
def test_scanned_blocks_compute_what_unrolled_blocks_do(name):
  """scan_blocks=True (with and without remat) holds the per-block variables stacked (`models.stack_blocks`) and gives
  the same logits, gradients and BatchNorm updates in training mode; its logical axes gain 'layers'."""
  variables = _init(name)
  scanned = _tiny(name, scan_blocks=True)
  stacked = models.stack_blocks(variables, scanned)
  _assert_same_arrays(models.unstack_blocks(stacked, name), variables)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  loss, grads, stats = _train_loss_grads_stats(_tiny(name), variables, images)
  want = loss, models.stack_blocks({'params': grads}, scanned)['params'], models.stack_blocks(stats, scanned)
  for remat in (False, True):
    model = _tiny(name, scan_blocks=True, remat=remat)
    assert jax.tree.map(jnp.shape, models.abstract_variables(model)) == jax.tree.map(jnp.shape, stacked)
    block = models.SCANNED_BLOCKS[type(model)]
    assert all(spec[0] == 'layers' for spec in jax.tree.leaves(
        models.logical_axes(model)['params'][block], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    got = _train_loss_grads_stats(model, stacked, images)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.slow
def test_scanned_mixer_keeps_the_stochastic_depth_schedule():
  """Scanned blocks get their rate i/(L-1) * stoch_depth as a traced scalar: with two blocks at stoch_depth 1
  the first never drops and the second always does, exactly as unrolled."""
  plain = _tiny('mixer_s32', num_blocks=2, stoch_depth=1.0)
  variables = models.init_variables(plain, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  want = _train_loss_grads_stats(plain, variables, images)
  scanned = _tiny('mixer_s32', num_blocks=2, stoch_depth=1.0, scan_blocks=True)
  got = _train_loss_grads_stats(scanned, models.stack_blocks(variables, scanned), images)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert not np.any(got[1]['MixerBlock']['channel_mixing']['Dense_0']['kernel'][1])  # dropped: no gradient


def test_unknown_remat_policy_lists_the_policies():
  with pytest.raises(ValueError, match=r"remat='dot': choose 'none', 'full', 'dots', 'dots_no_batch' \(or False, True\)"):
    models.abstract_variables(_tiny('mixer_s32', remat='dot'))


def test_scan_blocks_is_refused_where_blocks_differ():
  with pytest.raises(ValueError, match="davit_tiny has no option 'scan_blocks'"):
    models.create('davit_tiny', num_classes=5, scan_blocks=True)


def _assert_same_arrays(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
