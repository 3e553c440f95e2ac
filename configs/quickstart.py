"""Quickstart: a small model trained on Fashion-MNIST, offline, on a laptop CPU.

Command:  make quickstart
    or    python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
          python train.py --config=configs/quickstart.py:model=convmixer --workdir=workdirs/quickstart_convmixer
Hardware: any CPU (2 cores suffice); the data are Debian's `dataset-fashion-mnist` (no network).
"""
from configs import common

# Small members of each family sized for 28x28 grayscale images (replicated to RGB).
MODELS = {
    'mixer': dict(name='mixer_s16', patch_size=4, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32,
                  channels_mlp_dim=256, image_size=28),
    'convmixer': dict(name='convmixer_256_8', dim=128, depth=4, kernel_size=5, patch_size=2, image_size=28),
    'davit': dict(name='davit_tiny', dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                  image_size=28),
}


def get_config(arg=None):
  a = common.parse_arg(arg, model='mixer', epochs=5.0, steps=0, batch_size=128, lr=2e-3)
  if a.model not in MODELS:
    raise ValueError(f'unknown quickstart model {a.model!r}; choose one of {", ".join(MODELS)}')
  c = common.base_config()
  c.model = dict(MODELS[a.model], dtype='float32')
  c.num_classes = 10
  c.input.dataset = 'fashion_mnist'
  c.input.batch_size = a.batch_size
  c.input.pp = 'decode|grayscale_to_rgb|flip_lr|value_range(-1, 1)|onehot(10)|keep("image", "labels")'
  c.evals.test = dict(split='test', pp='decode|grayscale_to_rgb|value_range(-1, 1)|onehot(10)|keep("image", "labels")')
  if a.steps:  # a short run, e.g. a smoke test
    c.total_steps = a.steps
  else:
    c.total_epochs = a.epochs
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.optimizer = 'adam'
  c.lr = a.lr
  c.weight_decay = 1e-4
  c.schedule.type = 'cosine'
  c.schedule.warmup_steps = 200
  c.grad_clip_norm = 1.0
  return c
