"""Mixer resolution surgery (paper App. C): exact parity of the block-diagonal expansion, refusals, shapes, and
the resolution independence of ConvMixer and DaViT. Tiny models only; full-size ones through eval_shape."""
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

from mixer_jax import models
from mixer_jax.convert import resize

PATCH = 8
TINY_MIXER = dict(patch_size=PATCH, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32)


@functools.lru_cache
def _mixer(image_size, tokens_mlp_dim=8):
  """(tiny Mixer, its jitted apply); cached so each size compiles once."""
  model = models.create('mixer_s16', num_classes=5, image_size=image_size,
                        **{**TINY_MIXER, 'tokens_mlp_dim': tokens_mlp_dim})
  return model, jax.jit(model.apply)


def _random_params(model, seed=0):
  """Every leaf random and non-zero (head, biases and norms included), kernels scaled by 1/sqrt(fan_in)."""
  rng = np.random.default_rng(seed)

  def leaf(x):
    scale = 1 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim > 1 else 0.5
    return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)

  return jax.tree.map(leaf, models.abstract_variables(model)['params'])


def _assemble(images, k, grouping):
  """One image of K×K times the area from K² images, laid out as `grouping` groups the patches.

  images: (B, K², H, W, C). 'blocks': image p = i·K + j is the (i, j) tile. 'strided': patch (a, b) of image
  (i, j) lands at patch (K·a + i, K·b + j).
  """
  b, _, h, w, c = images.shape
  x = images.reshape(b, k, k, h // PATCH, PATCH, w // PATCH, PATCH, c)  # (b, i, j, a, y, b', x, c)
  order = (0, 1, 3, 4, 2, 5, 6, 7) if grouping == 'blocks' else (0, 3, 1, 4, 5, 2, 6, 7)
  return x.transpose(order).reshape(b, k * h, k * w, c)


@pytest.mark.parametrize('grouping, k, size', [
    ('blocks', 2, (32, 32)), ('strided', 2, (32, 32)), ('blocks', 3, (32, 32)), ('strided', 2, (32, 16))])
def test_expanded_mixer_mixes_each_group_as_in_pretraining(grouping, k, size):
  """Logits on an image assembled from K² images = mean of the pre-trained model's logits on them."""
  small, small_apply = _mixer(size)
  params = _random_params(small)
  old_grid = (size[0] // PATCH, size[1] // PATCH)
  new_grid = (k * old_grid[0], k * old_grid[1])
  new_params, tokens_mlp_dim = resize.resize_mixer(params, old_grid=old_grid, new_grid=new_grid, method=grouping)
  assert tokens_mlp_dim == k * k * 8
  big, big_apply = _mixer((k * size[0], k * size[1]), tokens_mlp_dim)

  images = np.random.default_rng(1).uniform(-1, 1, size=(2, k * k, *size, 3)).astype(np.float32)
  small_logits, _ = small_apply({'params': params}, images.reshape(-1, *size, 3))
  big_logits, _ = big_apply({'params': new_params}, _assemble(images, k, grouping))
  expected = small_logits.reshape(2, k * k, -1).mean(axis=1)
  assert float(jnp.abs(expected).max()) > 0.1  # a real signal, not a zero head
  np.testing.assert_allclose(big_logits, expected, atol=1e-5, rtol=0)


def test_token_groups_by_hand():
  """2x2 grid -> 4x4 (K = 2): the new grid written as the group, then the local index, of each token."""
  part, local = resize.token_groups(2, 4, 'blocks')
  np.testing.assert_array_equal(part.reshape(4, 4), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  np.testing.assert_array_equal(local.reshape(4, 4), [[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]])
  part, local = resize.token_groups(2, 4, 'strided')
  np.testing.assert_array_equal(part.reshape(4, 4), [[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]])
  np.testing.assert_array_equal(local.reshape(4, 4), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


@pytest.mark.parametrize('grouping', resize.GROUPINGS)
@pytest.mark.parametrize('old, new', [((4, 4), (12, 12)), ((3, 2), (6, 4))])
def test_token_groups_are_k_squared_copies_of_the_old_grid(grouping, old, new):
  part, local = resize.token_groups(old, new, grouping)
  k2, tokens = (new[0] // old[0]) ** 2, old[0] * old[1]
  pairs = sorted(zip(part.tolist(), local.tolist()))
  assert pairs == [(p, t) for p in range(k2) for t in range(tokens)]  # every (group, token) exactly once


@pytest.mark.parametrize('old, new, message', [
    ((4, 4), (6, 6), r'cannot expand the 4x4 token grid to 6x6 \(ratio 1.5\)'),
    ((14, 14), (21, 21), r'cannot expand the 14x14 token grid to 21x21 \(ratio 1.5\)'),
    ((4, 2), (8, 6), r'cannot expand the 4x2 token grid to 8x6 \(ratios 2 and 3\)'),
    ((4, 4), (2, 2), r'cannot expand the 4x4 token grid to 2x2 \(ratio 0.5\)'),
])
@pytest.mark.parametrize('method', resize.GROUPINGS)
def test_non_integer_ratio_is_refused_naming_both_grids(old, new, message, method):
  params = models.abstract_variables(models.create('mixer_s16', num_classes=5, image_size=(old[0] * 8, old[1] * 8),
                                                   **TINY_MIXER))['params']
  with pytest.raises(ValueError, match=message + r".*method='interpolate' for a non-paper resampling"):
    resize.resize_mixer(params, old_grid=old, new_grid=new, method=method)


def test_interpolate_is_opt_in_non_paper_and_runs_at_any_ratio():
  assert 'NOT the paper' in resize.interpolate_token_mixing.__doc__
  assert 'does NOT preserve the pre-trained function' in ' '.join(resize.interpolate_token_mixing.__doc__.split())
  small, _ = _mixer(32)
  params = _random_params(small)
  new_params, tokens_mlp_dim = resize.resize_mixer(params, old_grid=4, new_grid=6, method='interpolate')
  assert tokens_mlp_dim == 8  # D_S unchanged
  big, big_apply = _mixer(48)
  _assert_same_shapes(new_params, models.abstract_variables(big)['params'])
  images = np.random.default_rng(1).uniform(-1, 1, size=(2, 48, 48, 3)).astype(np.float32)
  logits, _ = big_apply({'params': new_params}, images)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))


def test_interpolate_keeps_the_response_to_a_spatially_constant_field():
  """Token-constant weights and input: hidden pre-activations and outputs are kept (the S/S' rescale)."""
  rng = np.random.default_rng(0)
  col, row, bias_0 = rng.normal(size=8), rng.normal(size=8), rng.normal(size=8)
  mlp = {'Dense_0': {'kernel': np.tile(col, (16, 1)), 'bias': bias_0},
         'Dense_1': {'kernel': np.tile(row[:, None], (1, 16)), 'bias': np.full(16, 0.3)}}
  new = resize.interpolate_token_mixing({'MixerBlock_0': {'token_mixing': mlp}}, 4, 6)['MixerBlock_0']
  new = new['token_mixing']

  def token_mlp(p, y):
    h = jax.nn.gelu(y @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
    return h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']

  np.testing.assert_allclose(token_mlp(new, np.full(36, 0.7)), np.full(36, token_mlp(mlp, np.full(16, 0.7))[0]),
                             rtol=1e-5)


def _assert_same_shapes(params, abstract):
  flat, expected = traverse_util.flatten_dict(params, sep='/'), traverse_util.flatten_dict(abstract, sep='/')
  assert {k: (v.shape, v.dtype) for k, v in flat.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}


def test_expanded_tree_equals_a_fresh_model_at_the_new_size():
  small, _ = _mixer(32)
  params = _random_params(small)
  new_params, tokens_mlp_dim = resize.resize_mixer(params, old_grid=4, new_grid=12, method='strided')
  fresh = models.abstract_variables(_mixer(96, tokens_mlp_dim=72)[0])['params']
  _assert_same_shapes(new_params, fresh)
  assert new_params['head'] is params['head'] and new_params['stem'] is params['stem']  # untouched


def test_mixer_b16_at_448_has_the_papers_parameter_count():
  """B/16 224 -> 448 (K = 2, D_S 384 -> 1536): 86,996,392 parameters (derived by hand from the paper's expansion),
  traced, not computed."""
  abstract = models.abstract_variables(models.create('mixer_b16', num_classes=1000))['params']
  grid, width = resize.mixer_token_grid(abstract)
  assert (grid, width) == ((14, 14), 384)
  new_params = jax.eval_shape(lambda p: resize.resize_mixer(p, old_grid=grid, new_grid=28)[0], abstract)
  assert models.count_params(new_params) == 86_996_392
  _assert_same_shapes(new_params, models.abstract_variables(
      models.create('mixer_b16', num_classes=1000, image_size=448, tokens_mlp_dim=1536))['params'])


def test_mixer_token_grid_and_bad_inputs():
  params = models.abstract_variables(models.create('mixer_s16', num_classes=5, image_size=(32, 16),
                                                   **TINY_MIXER))['params']
  with pytest.raises(ValueError, match='the 8 tokens of this Mixer do not form a square grid: pass its image_size'):
    resize.mixer_token_grid(params)
  assert resize.mixer_token_grid(params, (32, 16)) == ((4, 2), 8)
  with pytest.raises(ValueError, match='image size 32x32 with 8x8 patches does not give the 8 tokens'):
    resize.mixer_token_grid(params, 32)
  with pytest.raises(ValueError, match=r"token-mixing MLP has 8 tokens but old_grid 4x4 has 16"):
    resize.resize_mixer(params, old_grid=4, new_grid=8)
  with pytest.raises(ValueError, match="unknown resize method 'bicubic'; choose one of blocks, strided, interp"):
    resize.resize_mixer(params, old_grid=(4, 2), new_grid=(8, 4), method='bicubic')
  with pytest.raises(ValueError, match=r"not a Mixer params tree .*pass variables\['params'\]"):
    resize.resize_mixer({'params': params}, old_grid=(4, 2), new_grid=(8, 4))
  assert resize.resize_mixer(params, old_grid=(4, 2), new_grid=(4, 2)) == (params, 8)


# 448: ConvMixer-768/32's patch is 7
@pytest.mark.parametrize('name, new_size', [('davit_tiny', 384),
                                            pytest.param('convmixer_768_32', 448, marks=pytest.mark.slow)])
def test_convmixer_and_davit_need_no_surgery(name, new_size):
  """Their parameters do not depend on the resolution: the 224 variables apply unchanged at the new size (flax
  checks every parameter's shape against the module's declaration at the new size)."""
  variables = models.abstract_variables(models.create(name, num_classes=1000))
  model = models.create(name, num_classes=1000, image_size=new_size)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x)[0], variables,
                          jax.ShapeDtypeStruct((1, new_size, new_size, 3), jnp.float32))
  assert logits.shape == (1, 1000)


def test_tiny_convmixer_initialised_at_32_runs_at_48():
  model = models.create('convmixer_768_32', num_classes=5, image_size=32, dim=16, depth=1, kernel_size=3,
                        patch_size=4)
  variables = models.init_variables(model, jax.random.key(0))
  images = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  logits, out = jax.jit(model.apply)(variables, images)
  assert logits.shape == (2, 5) and out['stem'].shape == (2, 12, 12, 16)
  assert bool(jnp.all(jnp.isfinite(logits))) and float(jnp.abs(logits).max()) > 0
