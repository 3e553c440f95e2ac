"""Fine-tuning any model on a dataset preset: vit_jax's fine-tuning recipe (configs/common.py + DATASET_PRESETS).

Command:  python train.py --config=configs/finetune.py:model=mixer_b16,dataset=cifar10,init=Mixer-B_16.npz \
              --workdir=WORKDIR --config.input.data_dir=TFDS_DIR
          ...:model=mixer_b16,res=448,init=Mixer-B_16.npz   (the paper's block-diagonal token-MLP expansion;
              resize=strided for sub-grid groups, resize=interpolate for a non-paper resampling)
          ...:model=davit_tiny,dataset=oxford_iiit_pet,res=384
          ...:model=convmixer_768_32,dataset=imagefolder:/data/my_photos   (root/{train,test}/<class>/*.jpg;
              num_classes None: the class folders, counted by the trainer when the run starts)
Hardware: vit_jax's numbers come from 8 V100s (batch 512); on fewer or smaller devices keep batch 512 with
          --config.accum_steps (BatchNorm models: statistics are then per micro-batch) or lower lr with the batch.
Expected: Mixer-B/16 pre-trained on ImageNet-21k reaches 96.82% on CIFAR-10 at 224 (vit_jax README, 10k steps);
          L/16 98.34%. Short runs cost accuracy: CIFAR-100 at 500 steps gives ~77% instead of ~90%.

`init=` takes a Google .npz, a timm .safetensors/.pth or an orbax workdir; its head is replaced by a zero head as
vit_jax does, also when the class counts match (`keep_head=true` keeps a head of the right size), and the log
says what was loaded, re-initialised and left out. Oxford Flowers trains on train[:90%] and selects on
train[90%:], as big_vision's transfer config (the tfds `validation` split is left alone).
Recipe: SGD with momentum 0.9 (bfloat16 accumulator), lr 0.03, cosine after 500 warmup steps (100 for the small
presets), global-norm clip 1, batch 512, no weight decay, mixup or label smoothing, softmax cross-entropy.
Train: inception crop (5-100% of the area) at `res`, flip; eval: resize to `res` (vit_jax: no centre crop).
Values in [-1, 1] for Mixer (Google's weights), ImageNet mean/std for ConvMixer and DaViT (timm's weights).
"""
from configs import common

# name: (classes, train split, minival split, test split, steps, warmup steps, lr); vit_jax / big_vision transfer.
PRESETS = {
    'cifar10': (10, 'train[:98%]', 'train[98%:]', 'test', 10_000, 500, 0.03),
    'cifar100': (100, 'train[:98%]', 'train[98%:]', 'test', 10_000, 500, 0.03),
    'imagenet2012': (1000, 'train[:99%]', 'train[99%:]', 'validation', 20_000, 500, 0.03),
    'oxford_iiit_pet': (37, 'train[:90%]', 'train[90%:]', 'test', 500, 100, 0.003),
    'oxford_flowers102': (102, 'train[:90%]', 'train[90%:]', 'test', 500, 100, 0.003),  # big_vision transfer
}


def preset(dataset: str):
  if dataset.startswith(common.IMAGE_FOLDER):  # classes: None, the folders', counted when the run starts
    return None, 'train', None, 'test', 500, 100, 0.003
  if dataset not in PRESETS:
    raise ValueError(f'no fine-tuning preset for {dataset!r}; choose one of {", ".join(PRESETS)} or '
                     f'{common.IMAGE_FOLDER}<root>')
  return PRESETS[dataset]


def get_config(arg=None):
  a = common.parse_arg(arg, model='mixer_b16', dataset='cifar10', res=224, batch_size=512, steps=0, lr=0.0,
                       init='', resize='blocks', keep_head=False)
  classes, train_split, minival_split, test_split, steps, warmup, lr = preset(a.dataset)
  values = 'value_range(-1, 1)' if common.family(a.model) == 'mixer' else 'normalize'

  c = common.base_config()
  c.num_classes = classes
  labels = common.labels(c.get_ref('num_classes'))
  eval_pp = f'decode|resize({a.res})|{values}|' + labels
  c.model = common.model_config(a.model, image_size=a.res, dtype='bfloat16')
  c.init = a.init
  c.init_keep_head = a.keep_head
  c.init_resize = a.resize
  c.input.dataset = a.dataset
  c.input.split = train_split
  c.input.pp = f'decode|inception_crop({a.res})|flip_lr|{values}|' + labels
  c.input.batch_size = a.batch_size
  if minival_split:
    c.evals.minival = dict(split=minival_split, pp=eval_pp)
  c.evals.test = dict(split=test_split, pp=eval_pp)
  c.total_steps = a.steps or steps
  c.eval_every_steps = max(c.total_steps // 10, 1)
  c.log_every_steps = 10

  c.optimizer = 'sgd'
  c.optimizer_kw = dict(momentum=0.9, accumulator_dtype='bfloat16')
  c.lr = a.lr or lr
  c.grad_clip_norm = 1.0
  c.schedule.type = 'cosine'
  c.schedule.warmup_steps = warmup
  return c
