"""ConvMixer on ImageNet-1k: the authors' runs (locuslab/convmixer README, "exactly the settings" of the paper).

Command:  python train.py --config=configs/convmixer_i1k.py --workdir=WORKDIR --config.input.data_dir=TFDS_DIR
          python train.py --config=configs/convmixer_i1k.py:variant=768_32 ...
          python train.py --config=configs/convmixer_i1k.py:bn_group_size=0 ...  (global-batch BatchNorm)
Hardware: the authors used 10 RTX8000 (48 GB) for ~9 days (1536/20, 150 epochs) / ~8 days (768/32, 300 epochs);
          batch 640 is 64 per GPU. bf16 compute here (they used fp16 AMP).
Expected: 81.37% top-1 (convmixer_1536_20), 80.16% (convmixer_768_32, ReLU), with timm's eval crop_pct 0.96.

Recipe (timm fork flags translated): AdamW (0.9, 0.999, eps 1e-3), lr 0.01 with the one-cycle schedule (0 ->
0.01 at 2/5 -> 5e-4 at 4/5 -> 0), weight decay 2e-5 (timm's default, AdamW convention, kernels only), clip 1,
label smoothing 0.1. Augmentation as timm's train.py applies it (README "What each recipe applies"): per image,
timm's random-resized crop (8-100%, bilinear or bicubic at random, antialiased), flip, RandAugment
`rand-m9-mstd0.5-inc1`; per batch on device, mixup 0.5 / cutmix 0.5 switching per group of 64 images (the
authors' per-GPU collate; `:mixup_group_size=0` mixes the global batch), then random erasing 0.25 (pixel) on the
mixed, normalised images. BatchNorm statistics per group of 64 images (`bn_group_size=64`): the authors' `-b 64`
per GPU on 10 GPUs without SyncBN, running statistics averaged as their `--dist-bn reduce` (reference/recipes.md
sections 4 and 11); each micro-batch under accumulation must be a multiple of 64. `:bn_group_size=0` uses
global-batch statistics.
"""
from configs import common

EPOCHS = {'1536_20': 150.0, '768_32': 300.0, '1024_20_p14': 150.0}


def get_config(arg=None):
  a = common.parse_arg(arg, variant='1536_20', epochs=0.0, batch_size=640, bn_group_size=64,
                      mixup_group_size=64)
  if a.variant not in EPOCHS:
    raise ValueError(f'unknown ConvMixer variant {a.variant!r}; choose one of {", ".join(EPOCHS)}')
  c = common.base_config()
  c.model = common.model_config(f'convmixer_{a.variant}', dtype='bfloat16',
                                bn_group_size=a.bn_group_size or None)
  c.num_classes = 1000
  c.input.dataset = 'imagenet2012'
  c.input.split = 'train'
  # timm's --train-interpolation default, 'random' in the authors' runs: bilinear or bicubic per call
  c.input.pp = ('decode_jpeg_and_random_resized_crop(224, method="random")|flip_lr|'
                'randaug_timm("rand-m9-mstd0.5-inc1", interpolation="random")|normalize|'
                + common.labels(1000, smoothing=0.1))  # timm folds the smoothing into the mixup targets alike
  c.input.batch_size = a.batch_size
  # timm's pretrained config: crop_pct 0.96, the shorter side to floor(224 / 0.96), bicubic antialiased as PIL
  c.evals = common.imagenet_evals('decode|resize_small(233, method="bicubic", antialias=True)|central_crop(224)|'
                                  'normalize')
  del c.evals['minival']  # the authors train on the whole train split
  c.total_epochs = a.epochs or EPOCHS[a.variant]
  c.eval_every_epochs = 10.0

  c.mixup.update(mixup_alpha=0.5, cutmix_alpha=0.5, prob=1.0, switch_prob=0.5,
                 group_size=a.mixup_group_size or None)
  c.random_erasing.update(prob=0.25, mode='pixel')
  c.optimizer = 'adam'
  c.optimizer_kw.eps = 1e-3
  c.lr = 0.01
  c.weight_decay = 2e-5
  c.weight_decay_style = 'adamw'
  c.grad_clip_norm = 1.0
  c.schedule.type = 'onecycle'
  return c
