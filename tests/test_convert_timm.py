"""timm parity: random timm weights converted with from_timm give timm's logits; to_timm inverts from_timm."""
import numpy as np
import pytest
import jax

import torch_reference as ref
from timm.models.convmixer import ConvMixer as TimmConvMixer

from mixer_jax import convert, models

# (our name, timm architecture, timm kwargs, our overrides, resolution). timm's Mixer uses the exact GELU.
CASES = [
    ('mixer_s32', 'mixer_s32_224', {}, dict(act='gelu'), 224),
    ('mixer_b16', 'mixer_b16_224', {}, dict(act='gelu'), 224),
    ('convmixer_768_32', 'convmixer_768_32', {}, {}, 112),
    ('convmixer_1024_20_p14', 'convmixer_1024_20_ks9_p14', {}, {}, 112),
    ('convmixer_256_8', TimmConvMixer, dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10), {}, 32),
    ('davit_tiny', 'davit_tiny', {}, {}, 250),  # 250: every stage pads (63 -> 70, 32 -> 35, 16 -> 21, 8 -> 14)
    ('davit_small', 'davit_small', {}, {}, 224),
    # XLA's grouped convolution instead of the CPU default shift-and-add depthwise convolution
    ('convmixer_256_8', TimmConvMixer, dict(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10),
     dict(depthwise='conv'), 32),
    ('davit_tiny', 'davit_tiny', {}, dict(depthwise='conv'), 250),
]


IDS = [c[0] + ''.join(f'-{v}' for v in c[3].values()) for c in CASES]
# Each family keeps one case in make test-fast; the full-size ones (20-50 s each on 2 cores) run in make test.
FAST = ('mixer_s32-gelu', 'convmixer_256_8', 'convmixer_256_8-conv', 'davit_tiny-conv')


@pytest.mark.parametrize('name,timm_arch,timm_kwargs,overrides,res', [
    pytest.param(*case, id=i, marks=() if i in FAST else pytest.mark.slow) for case, i in zip(CASES, IDS)])
def test_logits_match_timm(name, timm_arch, timm_kwargs, overrides, res):
  timm_model = ref.create(timm_arch, calibration_size=res, **timm_kwargs)
  images = np.random.default_rng(1).standard_normal((2, res, res, 3)).astype(np.float32)
  want = ref.logits(timm_model, images)
  state_dict = timm_model.state_dict()
  variables = convert.from_timm(name, state_dict, image_size=res)
  model = models.create(name, num_classes=want.shape[1], image_size=res, **overrides)
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, images))
  assert want.std() > 0.05  # the comparison means something: logits differ between classes
  assert np.abs(got - want).max() < 1e-4
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  back = convert.to_timm(name, variables)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    assert back[key].dtype == value.numpy().dtype and np.array_equal(back[key], value.numpy()), key


def test_mismatches_are_listed_in_one_error():
  state_dict = {k: v.numpy() for k, v in ref.create('mixer_s32_224').state_dict().items()}
  del state_dict['blocks.3.norm2.weight']
  state_dict['blocks.0.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    convert.from_timm('mixer_s32', state_dict, image_size=256)  # 64 tokens, the weights have 49
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('state dict does not fit mixer_s32 (num_classes=1000, image_size=256): ')
  assert '1 missing: blocks.3.norm2.weight;' in message
  assert '1 unexpected: blocks.0.extra.weight;' in message
  assert '24 with the wrong shape: ' in message  # fc1 weight, fc2 weight and fc2 bias of 8 token MLPs
  for i in range(2):  # the first six are named, then how many more
    assert f'blocks.{i}.mlp_tokens.fc1.weight (256, 49) (expected (256, 64))' in message
    assert f'blocks.{i}.mlp_tokens.fc2.weight (49, 256) (expected (64, 256))' in message
    assert f'blocks.{i}.mlp_tokens.fc2.bias (49,) (expected (64,))' in message
  assert '... (18 more)' in message


def test_num_classes_comes_from_the_head_and_can_be_overridden():
  state_dict = ref.create(TimmConvMixer, dim=16, depth=1, kernel_size=3, patch_size=2,
                          num_classes=7).state_dict()
  variables = convert.from_timm('convmixer_256_8', state_dict, dim=16, depth=1, kernel_size=3)
  assert variables['params']['head']['bias'].shape == (7,)
  with pytest.raises(ValueError, match=r'num_classes=10.*head.bias \(7,\) \(expected \(10,\)\)'):
    convert.from_timm('convmixer_256_8', state_dict, dim=16, depth=1, kernel_size=3, num_classes=10)
