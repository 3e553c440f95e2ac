"""MLP-Mixer pre-training on ImageNet-21k, the paper's recipe (Table 4, App. B).

Command:  python train.py --config=configs/mixer_i21k.py:data=/data/imagenet21k --workdir=WORKDIR
          python train.py --config=configs/mixer_i21k.py:data=...,variant=l16 ...
Hardware: a TPU v3 pod (batch 4096), about 0.15k TPUv3 core-days for B/16 (paper).
Data:     tfds has no ImageNet-21k builder: extract the release (fall11, 21,843 classes) as an image folder,
          DATA/train/<wnid>/*.JPEG, and hold out a few images per class as DATA/val/<wnid>/*.JPEG (big_vision
          holds out 51,200 images as minival).
Expected: the paper fine-tunes this model to 80.64% (B/16) / 82.89% (L/16) ImageNet top-1 at 224 (Table 3);
          Google never published the i21k->i1k Mixer weights.

Recipe: Adam (0.9, 0.999), lr 1e-3, weight decay 0.1 (AdamW convention; big_vision's 1e-4), 10k warmup steps
then linear decay, clip 1, batch 4096, 300 epochs, sigmoid cross-entropy with head bias -10 (big_vision's i21k
ViT), RandAugment(2, 10) and mixup 0.2 for B (20 and 0.5 for L), stochastic depth 0.1.
"""
from configs import common

# Paper Table 4: RandAugment magnitude and mixup strength per size on ImageNet-21k.
AUGMENT = {'b': (10, 0.2), 'l': (20, 0.5)}


def get_config(arg=None):
  a = common.parse_arg(arg, data='', variant='b16', epochs=300.0, batch_size=4096, num_classes=21843)
  if not a.data:
    raise ValueError('give the ImageNet-21k image folder: configs/mixer_i21k.py:data=/path/to/imagenet21k')
  magnitude, mixup = AUGMENT.get(a.variant[0], AUGMENT['b'])
  labels = common.labels(a.num_classes)
  c = common.base_config()
  c.model = common.model_config(f'mixer_{a.variant}', stoch_depth=0.1, dtype='bfloat16')
  c.num_classes = a.num_classes
  c.input.dataset = common.IMAGE_FOLDER + a.data
  c.input.split = 'train'
  c.input.pp = (f'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, {magnitude})|value_range(-1, 1)|'
                + labels)
  c.input.batch_size = a.batch_size
  c.input.shuffle_buffer = 250_000
  c.evals.minival = dict(split='val', pp=f'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|{labels}')
  c.total_epochs = a.epochs
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000

  c.loss = 'sigmoid_xent'
  c.init_head_bias = -10.0
  c.mixup.mixup_alpha = mixup

  c.optimizer = 'adam'
  c.lr = 1e-3
  c.weight_decay = 0.1
  c.weight_decay_style = 'adamw'
  c.grad_clip_norm = 1.0
  c.schedule.type = 'linear'
  c.schedule.warmup_steps = 10_000
  c.schedule.end = 1e-5  # big_vision's linear_end
  return c
