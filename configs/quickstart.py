"""Quickstart: a small model trained on Fashion-MNIST, offline, on a laptop CPU.

Command:  make quickstart
    or    python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
          python train.py --config=configs/quickstart.py:model=convmixer,epochs=3 --workdir=workdirs/qs_convmixer
          python train.py --config=configs/quickstart.py:model=davit,epochs=2 --workdir=workdirs/qs_davit
Hardware: any CPU (2 cores suffice); the data are Debian's `dataset-fashion-mnist` (no network).
Expected (seed 0; 2 vCPUs, AMD EPYC): Mixer 89.37% test top-1 in 5 min 15 s; ConvMixer 90.27% in 6 min 43 s;
DaViT 88.23% in 7 min (README, Results). A short run: --config.total_steps=300 (84.8% in about a minute).
"""
from configs import common

# Small members of each family sized for 28x28 grayscale images.
MODELS = {
    # 7x7 patches: 16 tokens, and the stem loses nothing (49 pixels -> 128 channels). Channel MLP 2C rather than
    # Mixer's 4C: half the FLOPs on a CPU for the same accuracy on this small dataset.
    'mixer': dict(name='mixer_s16', patch_size=7, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64,
                  channels_mlp_dim=256, image_size=28),
    'convmixer': dict(name='convmixer_256_8', dim=128, depth=4, kernel_size=5, patch_size=4, image_size=28),
    'davit': dict(name='davit_tiny', dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                  image_size=28),
}


def get_config(arg=None):
  a = common.parse_arg(arg, model='mixer', epochs=6.0, steps=0, batch_size=128, lr=3e-3)
  if a.model not in MODELS:
    raise ValueError(f'unknown quickstart model {a.model!r}; choose one of {", ".join(MODELS)}')
  c = common.base_config()
  c.model = dict(MODELS[a.model], in_channels=1, dtype='float32')
  c.num_classes = 10
  c.input.dataset = 'fashion_mnist'
  c.input.batch_size = a.batch_size
  pp = f'decode(channels=1)|value_range(-1, 1)|{common.labels(10)}'
  c.input.pp = pp
  c.input.cache = 'decoded'  # the whole pp is deterministic: 60,000 x 28 x 28 float32 images, 190 MB of RAM
  c.evals.test = dict(split='test', pp=pp)
  if a.steps:  # a short run, e.g. a smoke test
    c.total_steps = a.steps
  else:
    c.total_epochs = a.epochs
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.label_smoothing = 0.1
  c.optimizer = 'adam'
  c.lr = a.lr
  c.weight_decay = 1e-4
  c.schedule.type = 'cosine'
  c.schedule.warmup_steps = 200
  c.grad_clip_norm = 1.0
  return c
