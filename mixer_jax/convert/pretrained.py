"""The public pre-trained checkpoints: where each comes from, its licence, the pre-processing it needs and the
accuracy published for it, so `eval.py --pretrained=NAME` can print expected against measured.

A table name is a checkpoint path wherever one is taken (`config.init`, `eval.py --checkpoint`, `convert`):
`source` is where it is downloaded from, once, into the cache (`paths.local_copy`). A missing local file whose
name is one of the table's gets an error naming where it comes from (`download_hint`). Accuracies are ImageNet-1k
validation top-1 unless the note says otherwise.

Known pitfalls recorded in the notes: timm's `mixer_*.goog_in21k_ft_in1k` tags are mislabelled (their accuracy
matches the paper's ImageNet-1k-only models; Google never published the i21k->i1k Mixer weights), and the
released ConvMixer-768/32 uses ReLU (our `convmixer_768_32` does too).
"""
import dataclasses
import os

from mixer_jax import cli


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  model: str  # mixer_jax model name
  url: str
  licence: str
  num_classes: int
  eval_family: str  # the data.presets.eval_pp family whose pre-processing the weights expect
  top1: float | None  # published ImageNet-1k top-1 (%), None when no comparable number exists
  source: str  # where the number comes from
  options: tuple = ()  # model options the weights need, e.g. (('act', 'gelu'),)
  image_pp: str = ''  # the image part of the eval pp when it is not the family preset's
  note: str = ''


_GOOGLE = 'gs://mixer_models/'
_HF = 'https://huggingface.co/timm/'
_HINTED = 3  # sources named by download_hint
_EXACT_GELU = (('act', 'gelu'),)  # timm's Mixer weights were trained (or converted) with the exact GELU

CHECKPOINTS = {
    'mixer_b16.goog_in1k': Checkpoint(
        'mixer_b16', _GOOGLE + 'imagenet1k/Mixer-B_16.npz', 'apache-2.0', 1000, 'mixer', 76.44,
        'MLP-Mixer paper, Table 3 (300 epochs on ImageNet-1k)'),
    'mixer_l16.goog_in1k': Checkpoint(
        'mixer_l16', _GOOGLE + 'imagenet1k/Mixer-L_16.npz', 'apache-2.0', 1000, 'mixer', 71.76,
        'MLP-Mixer paper, Table 3 (L/16 overfits ImageNet-1k)'),
    'mixer_b16.goog_in21k': Checkpoint(
        'mixer_b16', _GOOGLE + 'imagenet21k/Mixer-B_16.npz', 'apache-2.0', 21843, 'mixer', None,
        'pre-training only; the paper fine-tunes it to 80.64% on ImageNet-1k',
        note='21,843-class ImageNet-21k head: fine-tune it (configs/finetune.py) before evaluating'),
    'mixer_l16.goog_in21k': Checkpoint(
        'mixer_l16', _GOOGLE + 'imagenet21k/Mixer-L_16.npz', 'apache-2.0', 21843, 'mixer', None,
        'pre-training only; the paper fine-tunes it to 82.89% (224) / 83.91% (448)',
        note='21,843-class ImageNet-21k head'),
    'mixer_b16.goog_sam': Checkpoint(
        'mixer_b16', _GOOGLE + 'sam/Mixer-B_16.npz', 'apache-2.0', 1000, 'mixer', 77.4,
        'expected by vision_transformer #134, where a user measured 68.9% (unresolved)',
        note='SAM-trained; the pre-processing it was evaluated with was never published'),
    'mixer_b16_224.goog_in21k_ft_in1k': Checkpoint(
        'mixer_b16', _HF + 'mixer_b16_224.goog_in21k_ft_in1k', 'apache-2.0', 1000, 'mixer', 76.62,
        'timm results-imagenet.csv', options=_EXACT_GELU,
        note='mislabelled by timm: matches the paper\'s ImageNet-1k B/16 (76.44), not i21k->i1k (80.64)'),
    'mixer_l16_224.goog_in21k_ft_in1k': Checkpoint(
        'mixer_l16', _HF + 'mixer_l16_224.goog_in21k_ft_in1k', 'apache-2.0', 1000, 'mixer', 72.08,
        'timm results-imagenet.csv', options=_EXACT_GELU,
        note='mislabelled by timm: matches the paper\'s ImageNet-1k L/16 (71.76)'),
    'mixer_b16_224.miil_in21k_ft_in1k': Checkpoint(
        'mixer_b16', _HF + 'mixer_b16_224.miil_in21k_ft_in1k', 'apache-2.0', 1000, 'mixer', 82.31,
        'timm results-imagenet.csv', options=_EXACT_GELU,
        image_pp='decode|resize_small(256, method="bilinear")|central_crop(224)|value_range(0, 1)',
        note='Alibaba MIIL weights: inputs in [0, 1] (timm mean 0, std 1) and bilinear resizing'),
    'convmixer_1536_20.in1k': Checkpoint(
        'convmixer_1536_20', _HF + 'convmixer_1536_20.in1k', 'mit', 1000, 'convmixer', 81.37,
        'locuslab/convmixer README (timm eval 81.382)'),
    'convmixer_768_32.in1k': Checkpoint(
        'convmixer_768_32', _HF + 'convmixer_768_32.in1k', 'mit', 1000, 'convmixer', 80.16,
        'locuslab/convmixer README (timm eval 80.158)', note='trained with ReLU'),
    'convmixer_1024_20_ks9_p14.in1k': Checkpoint(
        'convmixer_1024_20_p14', _HF + 'convmixer_1024_20_ks9_p14.in1k', 'mit', 1000, 'convmixer', 76.94,
        'locuslab/convmixer README (timm eval 76.944)'),
    'davit_tiny.msft_in1k': Checkpoint(
        'davit_tiny', _HF + 'davit_tiny.msft_in1k', 'apache-2.0', 1000, 'davit', 82.8,
        'DaViT paper (timm eval at crop_pct 0.95: 82.694)'),
    'davit_small.msft_in1k': Checkpoint(
        'davit_small', _HF + 'davit_small.msft_in1k', 'apache-2.0', 1000, 'davit', 84.2,
        'DaViT paper (timm eval: 84.252)'),
    'davit_base.msft_in1k': Checkpoint(
        'davit_base', _HF + 'davit_base.msft_in1k', 'apache-2.0', 1000, 'davit', 84.6,
        'DaViT paper (timm eval: 84.652)'),
}


def get(name: str) -> Checkpoint:
  if name not in CHECKPOINTS:
    raise ValueError(f'unknown pre-trained checkpoint {name!r}{cli.did_you_mean(name, list(CHECKPOINTS))}; known: '
                     f'{", ".join(CHECKPOINTS)}')
  return CHECKPOINTS[name]


def source(name: str) -> str:
  """Where the table's entry `name` is downloaded from: its bucket object, or its hub repository (hf-hub:...)."""
  url = get(name).url
  return 'hf-hub:' + url[len('https://huggingface.co/'):] if url.startswith(_HF) else url


def download_hint(path: str, entry: Checkpoint | None = None) -> str:
  """For a checkpoint file that is missing: ': download it from <url>' naming `entry`'s source, else the table's
  entries whose file, entry name or model the file name gives (`Mixer-B_16.npz`, `davit_tiny.safetensors`); ''
  when none does."""
  if entry is None:
    file = os.path.basename(path.rstrip('/'))
    stem = file.split('.')[0]
    entries = [e for name, e in CHECKPOINTS.items()
               if file == os.path.basename(e.url) or stem in (name, name.split('.')[0], e.model)]
  else:
    entries = [entry]
  if not entries:
    return ''
  sources = [e.url + (' (its model.safetensors)' if e.url.startswith(_HF) else '') for e in entries[:_HINTED]]
  more = f' ({len(entries) - _HINTED} more in mixer_jax/convert/pretrained.py)' if len(entries) > _HINTED else ''
  return f': download it from {" or ".join(sources)}{more}'
