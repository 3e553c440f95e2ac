"""BENCHMARKS.md's compile tables: every recipe compiled for the hardware it names, one command per platform.

  python -m mixer_jax.bench compile-table --platform=tpu|gpu [--shard=I/N] [--jsonl FILE]
  python -m mixer_jax.bench compile-table --platform=tpu|gpu --table_from FILE

compiles each row's train step (`aot.compile_run`, or `aot.max_batch` for the rows that search the largest batch)
and prints the rows as a markdown table as they complete. A recipe change moves its rows: rerun the command and
paste its table. `--shard=0/2` and `--shard=1/2` split the rows between two processes (one per core, every other
row each); `--table_from` prints the table of their JSON lines in the rows' order (a row's report is the line
with its config, topology and kind).

A row names its recipe with its arguments and overrides exactly as `bench compile` takes them, so each row is
also one `bench compile` command.
"""
from typing import NamedTuple

from mixer_jax import aot


class Row(NamedTuple):
  label: str  # what the table shows in its first column
  config: tuple[str, ...]  # --config=... and --config.field=value arguments
  topology: str
  max_batch: bool = False  # search the largest global batch that fits instead
  published: str = '–'  # the anchors' published figure for this hardware, where one exists


_FSDP_REMAT = ('--config.mesh.shape=(1,-1,1)', '--config.model.remat=full')
_I21K = 'configs/mixer_i21k.py:data=/nonexistent/imagenet21k'  # only its class count matters to the program

TPU_ROWS = (
    Row('`mixer_i1k.py` (B/16)', ('--config=configs/mixer_i1k.py',), 'v3:8x8',
        published='378 img/s/core (big_vision, 300 epochs in 2 h 11 min)'),
    Row('`mixer_i21k.py:data=...` (B/16, 21,843 classes)', (f'--config={_I21K}',), 'v3:8x8'),
    Row('`convmixer_i1k.py:variant=768_32`', ('--config=configs/convmixer_i1k.py:variant=768_32',), 'v3:2x2'),
    Row('`convmixer_i1k.py` (1536/20)', ('--config=configs/convmixer_i1k.py',), 'v3:2x2'),
    Row('`convmixer_i1k.py` (1536/20)', ('--config=configs/convmixer_i1k.py',), 'v3:4x4'),
    Row('`davit_i1k.py:variant=tiny`', ('--config=configs/davit_i1k.py',), 'v3:2x2'),
    Row('`davit_i1k.py:variant=small`', ('--config=configs/davit_i1k.py:variant=small',), 'v3:2x2'),
    Row('`davit_i1k.py:variant=base`', ('--config=configs/davit_i1k.py:variant=base',), 'v3:2x2'),
    Row('`mixer_i1k.py:variant=h14`, FSDP, remat full', ('--config=configs/mixer_i1k.py:variant=h14', *_FSDP_REMAT),
        'v4-8'),
    Row('`davit_i1k.py:variant=base` as `davit_huge`, FSDP, remat full',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_huge', *_FSDP_REMAT), 'v4-8'),
    Row('the same as `davit_giant`',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_giant', *_FSDP_REMAT), 'v4-8'),
    Row('the same as `davit_giant`',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_giant', *_FSDP_REMAT), 'v5p-8'),
)

# The authors' per-GPU batches: big_vision's gpu8 mode for Mixer (64 per GPU, configs/mixer_i1k.py), the ConvMixer
# authors' 64 per GPU, DaViT's 128 per GPU; then the largest batch that fits for the flagship variants, and the
# largest variants at their recipe's batch on one host (FSDP over its 8 GPUs).
_TIMM_3090 = 'timm, RTX 3090 training (AMP): {} img/s'
GPU_ROWS = tuple(
    row for gpu in ('a100-80gb:8', 'h100:8') for row in (
        Row('`mixer_i1k.py:batch_size=512` (B/16, big_vision gpu8)', ('--config=configs/mixer_i1k.py:batch_size=512',),
            gpu, published=_TIMM_3090.format(557)),
        Row('`mixer_i21k.py:data=...,batch_size=512`', (f'--config={_I21K},batch_size=512',), gpu),
        Row('`convmixer_i1k.py:variant=768_32,batch_size=512`',
            ('--config=configs/convmixer_i1k.py:variant=768_32,batch_size=512',), gpu,
            published=_TIMM_3090.format(187) + '; authors ~56 img/s per RTX 8000'),
        Row('`convmixer_i1k.py:batch_size=512` (1536/20)', ('--config=configs/convmixer_i1k.py:batch_size=512',), gpu,
            published=_TIMM_3090.format(20.8) + '; authors ~25 img/s per RTX 8000'),
        Row('`davit_i1k.py` (tiny)', ('--config=configs/davit_i1k.py',), gpu),
        Row('`davit_i1k.py:variant=small`', ('--config=configs/davit_i1k.py:variant=small',), gpu),
        Row('`davit_i1k.py:variant=base`', ('--config=configs/davit_i1k.py:variant=base',), gpu),
    )) + (
    Row('`mixer_i1k.py`, largest batch', ('--config=configs/mixer_i1k.py:batch_size=2048',), 'h100:8', max_batch=True),
    Row('`convmixer_i1k.py` (1536/20), largest batch', ('--config=configs/convmixer_i1k.py:batch_size=512',),
        'h100:8', max_batch=True),
    Row('`davit_i1k.py` (tiny), largest batch', ('--config=configs/davit_i1k.py',), 'h100:8', max_batch=True),
    Row('`mixer_i1k.py:variant=h14`, FSDP', ('--config=configs/mixer_i1k.py:variant=h14',
                                             '--config.mesh.shape=(1,-1,1)'), 'h100:8'),
    Row('`mixer_i1k.py:variant=h14`, FSDP, remat full', ('--config=configs/mixer_i1k.py:variant=h14', *_FSDP_REMAT),
        'h100:8'),
    Row('`davit_i1k.py:variant=base` as `davit_huge`, FSDP',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_huge',
         '--config.mesh.shape=(1,-1,1)'), 'h100:8'),
    Row('the same as `davit_giant`',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_giant',
         '--config.mesh.shape=(1,-1,1)'), 'h100:8'),
    Row('the same as `davit_giant`, remat full',
        ('--config=configs/davit_i1k.py:variant=base', '--config.model.name=davit_giant', *_FSDP_REMAT), 'h100:8'),
)
ROWS = {'tpu': TPU_ROWS, 'gpu': GPU_ROWS}


def header(platform: str) -> str:
  columns = ['recipe', 'hardware', 'mesh (data×fsdp×model)', 'batch (per device)', 'fits: GiB per device',
             'GFLOP/img XLA / analytic', 'collectives MB/step', 'roofline: step, img/s/device, MFU']
  columns += (['collectives at least: NVLink / network', 'published (other hardware)'] if platform == 'gpu'
              else ['XLA cost model: step, img/s/device'])
  return '| ' + ' | '.join(columns) + ' |\n|' + '---|' * len(columns)


def _number(value: float) -> str:
  return f'{value:,.0f}' if value >= 100 else f'{value:.3g}'


def format_row(row: Row, report: dict, platform: str) -> str:
  train = report['train']
  mesh = '×'.join(str(n) for n in report['mesh'].values())
  batch = f'{report["global_batch"]} ({report["batch_per_device"]:g})'
  if 'max_batch' in report:
    batch = f'**{report["max_batch"]}** ({report["batch_per_device"]:g})'
  dashes = ['–'] * (5 if platform == 'gpu' else 4)
  if 'step_gib' not in train:
    fits = f'**no**: needs {train["needed_gib"]:.2f} of {train["available_gib"]:.2f} GiB' if 'needed_gib' in train \
        else '**no**'
    cells = [fits, *dashes]
  else:
    capacity = f'{report["memory_gib"]:.4g}'
    fits = (f'yes, {train["step_gib"]:.2f} of {capacity}' if train['fits']
            else f'**no**: {train["step_gib"]:.2f} of {capacity}' + (' (XLA: cannot reduce)'
                                                                      if 'compiler_message' in train else ''))
    bound = train['roofline']
    roofline = (f'{_number(bound["step_ms"])} ms ({"compute" if bound["bound_by"] == "compute" else "HBM"}): '
                f'{_number(bound["images_per_s_per_device"])} img/s, {bound["mfu"]:.0%}') if bound else '(scanned)'
    cells = [fits, f'{_number(train["xla_gflops_per_image"])} / {_number(train["analytic_gflops_per_image"])}',
             f'{train["collective_mb_per_device"]:,.0f}', roofline]
    if platform == 'gpu':
      t = train['collective_time']
      cells.append(f'{_number(t["nvlink_ms"])} / {_number(t["network_ms"])} ms')
    else:
      cost = train['xla_optimal_ms']
      cells.append(f'{_number(cost)} ms, {_number(report["global_batch"] / report["devices"] / cost * 1e3)} img/s'
                   if cost else '(overflows)')
  if platform == 'gpu':
    cells.append(row.published)
  return '| ' + ' | '.join([row.label, row.topology, mesh, batch, *cells]) + ' |'


def run_row(row: Row) -> dict:
  from mixer_jax import cli
  config = cli.load_config(list(row.config))
  if not row.max_batch:
    return aot.compile_run(config, row.topology, steps=('train',))
  result = aot.max_batch(config, row.topology, log=lambda line: None)
  return dict(result['report'], max_batch=result['max_batch'], max_batch_tries=result['tries'])


def shard_of(text: str) -> tuple[int, int]:
  index, _, count = text.partition('/')
  try:
    index, count = int(index), int(count)
  except ValueError:
    raise ValueError(f'--shard {text!r}: give I/N, e.g. 0/2') from None
  if not 0 <= index < count:
    raise ValueError(f'--shard {text!r}: I must be in 0..N-1')
  return index, count


def rows_of(platform: str, shard: str = '0/1') -> list[Row]:
  """The platform's rows in the shard: every N-th from the I-th."""
  index, count = shard_of(shard)
  return list(ROWS[platform])[index::count]


def key_of(config, topology: str, max_batch: bool) -> tuple:
  """What identifies a row's report among the JSON lines of several runs."""
  return tuple(config), topology, bool(max_batch)
