"""The benchmark tool (not speed): it runs real train and inference steps and emits well-formed rows, and the
analytic FLOP counts behind MFU agree with XLA's cost analysis of the compiled steps."""
import json

import pytest

from mixer_jax import bench, flops, models

TINY_MIXER = 'hidden_dim=32,num_blocks=2,tokens_mlp_dim=16,channels_mlp_dim=64'


@pytest.mark.slow
def test_model_benchmark_writes_a_table_and_json_lines(tmp_path, capsys):
  jsonl = tmp_path / 'bench.jsonl'
  bench.main(['model', '--model', 'mixer_s32', '--model_options', TINY_MIXER, '--res', '64', '--batch', '8',
              '--mode', 'train,infer', '--steps', '2', '--repeats', '2', '--warmup', '1', '--baseline',
              '--jsonl', str(jsonl)])
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith('| model | mode |')
  # a tiny model is mostly norms and activations, which XLA counts and the analytic count does not: a note says so
  assert [line.split(' | ')[1] for line in table if line.startswith('| mixer_s32')] == ['train', 'infer']
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
  assert [(r['model'], r['mode'], r['batch'], r['res'], r['devices']) for r in rows] == [
      ('mixer_s32', 'train', 8, 64, 8), ('mixer_s32', 'infer', 8, 64, 8)]
  for row in rows:
    assert len(row['step_s_repeats']) == 2 and row['step_s'] > 0 and row['compile_s'] > 0
    assert row['images_per_s'] == pytest.approx(8 / row['step_s'])
    assert row['images_per_s_per_device'] == pytest.approx(row['images_per_s'] / 8)
    assert row['mfu'] is None and row['peak_tflops_per_device'] is None  # no peak known for a CPU
    assert row['host_peak_gib'] > 0 and row['step_gib'] > 0
  train, infer = rows
  assert train['step_over_baseline'] == pytest.approx(train['step_s'] / train['baseline_step_s'])
  assert len(train['baseline_step_s_repeats']) == 2
  assert 'baseline_step_s' not in infer
  assert train['analytic_gflops_per_image'] == pytest.approx(3 * infer['analytic_gflops_per_image'])


def test_timed_calls_take_turns():
  calls = []
  times = bench._time_calls({'ours': lambda: calls.append('ours'), 'plain': lambda: calls.append('plain')},
                            steps=2, repeats=2, warmup=1)
  assert calls == ['ours', 'plain'] + ['ours', 'ours', 'plain', 'plain'] * 2
  assert [len(t) for t in times.values()] == [2, 2]


@pytest.mark.slow
def test_peak_override_gives_mfu(capsys):
  row = bench.model_benchmark('mixer_s32', mode='infer', batch=8, res=64, steps=1, repeats=1, warmup=0, peak=0.5,
                              model_options=dict(hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                                                 channels_mlp_dim=64))
  assert row['mfu'] == pytest.approx(row['images_per_s'] * row['xla_gflops_per_image'] / (0.5e3 * 8))


@pytest.mark.slow
def test_scanned_blocks_take_mfu_from_the_analytic_count(tmp_path, capsys):
  """XLA's cost analysis counts a scanned loop body once; `scan_blocks=true` (lower-case, as typed) scans."""
  jsonl = tmp_path / 'bench.jsonl'
  options = 'hidden_dim=128,num_blocks=8,tokens_mlp_dim=16,channels_mlp_dim=512,scan_blocks=true'  # matmul-bound
  bench.main(['model', '--model', 'mixer_s32', '--model_options', options,
              '--res', '64', '--batch', '8', '--mode', 'infer', '--steps', '1', '--repeats', '1', '--warmup', '0',
              '--peak_tflops', '0.5', '--jsonl', str(jsonl)])
  assert 'note: scanned blocks' in capsys.readouterr().out
  row = json.loads(jsonl.read_text())
  assert row['mfu_flops'] == 'analytic' and row['xla_over_analytic'] < 0.5  # one block of eight, the stem and the head
  assert row['mfu'] == pytest.approx(row['images_per_s'] * row['analytic_gflops_per_image'] / (0.5e3 * 8))


def test_unknown_model_stops_with_one_line(capsys):
  with pytest.raises(SystemExit) as exit:
    bench.main(['model', '--model', 'mixer_b17'])
  assert str(exit.value).startswith("error: unknown model 'mixer_b17'") and '\n' not in str(exit.value)


def test_published_mac_counts():
  """timm's `infer_gmacs` (timm's results tables; ConvMixer with its depthwise MACs)."""
  published = {'mixer_b16': 12.62, 'mixer_l16': 44.6, 'convmixer_768_32': 20.68, 'convmixer_1536_20': 51.10,
               'davit_tiny': 4.54, 'davit_small': 8.80, 'davit_base': 15.51}
  for name, gmacs in published.items():
    assert flops.macs_per_image(models.create(name, num_classes=1000)) / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize('name,options,mode', [
    # the real widths at 224, fewer blocks: XLA's count includes norms and activations that the analytic one skips.
    # Training steps and DaViT are checked against XLA:TPU, the target (tests/test_aot.py).
    ('mixer_b16', dict(num_blocks=2), 'infer'),
    ('convmixer_768_32', dict(depth=2), 'infer'),
])
def test_analytic_flops_match_xla_within_10_percent(name, options, mode):
  step = bench.compile_step(name, mode=mode, batch=8, model_options=options)  # compiled on 8 devices, not run
  ratio = step.xla_flops_per_image() / flops.flops_per_image(step.model, mode)
  assert 0.9 <= ratio <= 1.1, ratio
