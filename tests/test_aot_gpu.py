"""Compiling for NVIDIA GPUs on this CPU machine (mixer_jax.gpus, XLA:GPU's compiler from `make gpu-compiler`):
tiny models of every family on data-parallel, FSDP and tensor-parallel meshes of one host of 8 H100s and of two,
what the compiled programs hold, FLOPs with the library calls counted, memory that does not fit, the command and
its JSON, the GPU descriptions. Nothing runs on a GPU."""
import json
import os

import numpy as np
import pytest

from mixer_jax import aot, bench, flops, gpus, hlo, models
from test_aot import BATCH, MESHES, reports, state_bytes_per_device  # noqa: F401 (reports: a fixture)

RESOLVED = {'h100:8': {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (2, 1, 4)},
            'h100:2x8': {'data': (16, 1, 1), 'fsdp': (1, 16, 1), 'tensor': (4, 1, 4)}}


@pytest.mark.slow
@pytest.mark.parametrize('topology', list(RESOLVED))
@pytest.mark.parametrize('family', ['mixer', 'convmixer', 'davit'])
def test_every_family_compiles_on_every_mesh(reports, family, topology):
  for mesh in MESHES:
    report = reports(family, mesh, topology)
    train = report['train']
    assert report['device_kind'] == 'NVIDIA H100 80GB HBM3' and report['platform'] == 'gpu'
    assert report['mesh'] == dict(zip(('data', 'fsdp', 'model'), RESOLVED[topology][mesh]))
    assert train['fits'] and 0 < train['step_gib'] < 1 and train['xla_gflops_per_device'] > 0
    assert train['roofline']['step_ms'] > 0
  data = reports(family, 'data', topology)['train']['collectives']
  fsdp = reports(family, 'fsdp', topology)['train']['collectives']
  # data parallel: the gradients are all-reduced (in bfloat16 at least: 2 bytes a parameter), nothing gathered
  assert data['all-reduce']['bytes'] >= 2 * reports(family, 'data', topology)['parameters']
  assert 'all-gather' not in data
  # FSDP: the sharded parameters are gathered before use, the gradients reduce-scattered (or reduced)
  assert fsdp['all-gather']['count'] >= 1 and ('reduce-scatter' in fsdp or 'all-reduce' in fsdp)


@pytest.mark.slow
def test_collectives_cross_hosts_only_on_two_hosts(reports):
  """One host: the gradient all-reduce goes over NVLink; two hosts: its share crosses the network too."""
  one, two = (reports('mixer', 'data', t)['train']['collective_time'] for t in ('h100:8', 'h100:2x8'))
  assert one['nvlink_ms'] > 0 and one['network_ms'] == 0
  assert two['network_ms'] > 0


@pytest.mark.slow
def test_fsdp_keeps_an_eighth_of_the_state_per_device():
  """Parameters and Adam moments per device (the step's arguments less its batch): FSDP over 8 GPUs holds 1/8 of
  what data parallelism does."""
  state = state_bytes_per_device('h100:8')
  assert state['fsdp'] == pytest.approx(state['data'] / 8, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize('name,options,mode', [
    # the real widths at 224, one block: cuBLAS GEMMs and cuDNN convolutions counted from their shapes
    ('mixer_b16', dict(num_blocks=1), 'train'),
    ('convmixer_768_32', dict(depth=1), 'train'),
    ('davit_tiny', dict(depths=(1, 1, 1, 1), image_size=112), 'infer'),
])
def test_analytic_flops_match_xla_gpu_within_10_percent(name, options, mode):
  """8 images per GPU: XLA:GPU pads GEMM dimensions to multiples of 8 for the tensor cores, which at one image per
  GPU makes DaViT's 49-token rows 56 (the executed FLOPs, 1.12x the model's)."""
  c = bench.bench_config(name, batch=64, dtype='bfloat16', model_options=options)
  kind = 'eval' if mode == 'infer' else 'train'
  step = aot.compile_run(c, 'h100:8', steps=(kind,))[kind]
  assert 0.9 <= step['xla_over_analytic'] <= 1.1, step['xla_over_analytic']
  assert step['library_calls']['count'] > 0 and not step['library_calls']['uncounted']
  model = models.create(name, num_classes=1000, **options)
  assert step['analytic_gflops_per_image'] == pytest.approx(flops.flops_per_image(model, mode) / 1e9)


@pytest.mark.slow
def test_command_prints_the_report_and_writes_json(tmp_path, capsys):
  jsonl = tmp_path / 'compile.jsonl'
  bench.main(['compile', '--config=configs/quickstart.py', '--topology=a3-highgpu-8g', '--jsonl', str(jsonl),
              f'--config.input.batch_size={BATCH}'])
  out = capsys.readouterr().out
  assert "XLA:GPU's compiler" in out and 'not a measurement' in out and 'eval step:' in out and 'NVLink' in out
  (line,) = jsonl.read_text().splitlines()
  report = json.loads(line)
  assert report['hosts'] == 1 and report['gpus_per_host'] == 8 and report['network_gbps'] == 100.0
  assert report['memory_gib'] == pytest.approx(81_559 / 1024 * 0.75)
  for step in (report['train'], report['eval']):
    bound = step['roofline']
    assert bound['step_ms'] == max(bound['compute_ms'], bound['memory_ms'])
    assert bound['compute_ms'] == pytest.approx(step['xla_gflops_per_device'] / 989e3 * 1e3)
    assert bound['images_per_s_per_device'] == pytest.approx(BATCH / 8 / (bound['step_ms'] / 1e3))


@pytest.mark.slow
def test_a_batch_far_too_large_does_not_fit(tmp_path, capsys, monkeypatch):
  """XLA:GPU compiles it anyway, warning it cannot reduce memory below its limit: the step is refused, exit 1.
  JAX's share of the card is what it may use: XLA_PYTHON_CLIENT_MEM_FRACTION is honoured."""
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  jsonl = tmp_path / 'compile.jsonl'
  with pytest.raises(SystemExit) as exit:
    bench.main(['compile', '--config=configs/quickstart.py', '--topology=a100-40gb:8', '--train_only', '--jsonl',
                str(jsonl), '--config.input.batch_size=65536', '--config.model.hidden_dim=1024'])
  message = str(exit.value)
  assert message.startswith('error: the train step does not fit on a100-40gb:8') and '\n' not in message
  report = json.loads(jsonl.read_text())
  assert report['memory_gib'] == 20.0 and not report['train']['fits']
  assert report['train']['step_gib'] > 20.0
  assert 'does not fit' in capsys.readouterr().out


def test_out_of_memory_warning_is_not_fitting():
  log = ['W0000 00:00:1.0 1 hlo_rematerialization.cc:3022] Can\'t reduce memory use below 59.33GiB (63701832089 '
         'bytes) by rematerialization; only reduced to 100.30GiB (107696604528 bytes), down from 100.30GiB']
  assert gpus.out_of_memory(log).startswith("Can't reduce memory use below 59.33GiB")
  assert gpus.out_of_memory(['something else']) is None


def test_the_compile_takes_the_pinned_ptxas_and_cublas_gemms():
  """Not whichever ptxas the machine has on PATH: the one requirements-gpu-compile.txt pins."""
  options = gpus.load_compiler()
  nvcc = os.path.join(gpus.COMPILER_DIR, 'nvidia', 'cuda_nvcc')
  assert options == {'xla_gpu_enable_triton_gemm': False, 'xla_gpu_cuda_data_dir': nvcc}
  assert os.access(os.path.join(nvcc, 'bin', 'ptxas'), os.X_OK)


@pytest.mark.parametrize('name', list(gpus.GPUS))
def test_every_gpu_description_loads(name):
  topology = gpus.topology_name(f'{name}:1x2')
  gpus.load_compiler()
  devices = gpus.topology_devices(topology)
  assert [d.device_kind for d in devices] == [gpus.GPUS[name].device_kind] * 2
  assert [d.process_index for d in devices] == [0, 0]


def test_topology_names():
  assert gpus.topology_name('h100:8')[1:] == (gpus.GPUS['h100'], 1, 8, 400.0)
  assert gpus.topology_name('h100:2x8')[2:4] == (2, 8)
  assert gpus.topology_name('NVIDIA A100-SXM4-80GB:4x8')[1:4] == (gpus.GPUS['a100-80gb'], 4, 8)
  assert gpus.topology_name('a3-highgpu-8g').network_gbps == 100.0
  assert gpus.topology_name('a3-ultragpu-8g:2x8')[1:4] == (gpus.GPUS['h200'], 2, 8)
  assert gpus.is_gpu_topology('h100:8') and not gpus.is_gpu_topology('v3-8')
  for name, message in [('h100', 'say how many GPUs'), ('h100:2x', 'give <gpu>:<gpus per host>'),
                        ('a3-highgpu-8g:4', 'a3-highgpu-8g hosts have 8 GPUs'), ('rtx9090:8', 'no description')]:
    with pytest.raises(ValueError, match=message):
      gpus.topology_name(name)


def test_library_call_flops_from_shapes():
  """A cuBLAS GEMM and cuDNN's three convolution passes, as XLA:GPU prints them."""
  text = '\n'.join([
      '  %p0 = bf16[64,256]{1,0} parameter(0)',
      '  %p1 = bf16[256,128]{1,0} parameter(1)',
      '  %gemm = (bf16[64,128]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", '
      'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
      '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}',
      '  %x = bf16[2,16,16,8]{3,2,1,0} parameter(2)',
      '  %k = bf16[3,3,1,8]{3,2,1,0} parameter(3)',
      '  %y = (bf16[2,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, '
      'dim_labels=b01f_01io->b01f, feature_group_count=8, custom_call_target="__cudnn$convForward"',
      '  %dy = bf16[2,16,16,8]{3,2,1,0} parameter(4)',
      '  %dx = (bf16[2,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %k), window={size=3x3 pad=1_1x1_1}, '
      'dim_labels=b01f_01io->b01f, feature_group_count=8, custom_call_target="__cudnn$convBackwardInput"',
      '  %dk = (bf16[3,3,1,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=3x3 pad=1_1x1_1}, '
      'dim_labels=b01f_01io->b01f, feature_group_count=8, custom_call_target="__cudnn$convBackwardFilter"',
      '  %other = f32[4]{0} custom-call(%p0), custom_call_target="SomethingElse"'])
  calls = gpus.library_calls(text)
  conv = 2 * (2 * 16 * 16) * (3 * 3 * 1 * 8)  # output positions x kernel elements: depthwise, 8 channels
  assert calls['flops'] == 2 * 64 * 128 * 256 + 3 * conv
  assert calls['calls'] == 4 and calls['uncounted'] == ['SomethingElse']


def test_replica_groups_in_every_form():
  assert hlo.replica_groups('replica_groups={{0,2},{1,3}}, x', 4).tolist() == [[0, 2], [1, 3]]
  assert hlo.replica_groups('replica_groups={}, x', 4).tolist() == [[0, 1, 2, 3]]
  np.testing.assert_array_equal(hlo.replica_groups('replica_groups=[2,4]<=[8], x', 8),
                                np.arange(8).reshape(2, 4))
  np.testing.assert_array_equal(hlo.replica_groups('replica_groups=[4,2]<=[2,4]T(1,0), x', 8),
                                np.arange(8).reshape(2, 4).T)
  np.testing.assert_array_equal(hlo.replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, x", 8),
                                np.arange(8).reshape(2, 4).T)
  np.testing.assert_array_equal(hlo.replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, x", 8),
                                np.arange(8).reshape(2, 4))
