"""GPU readiness without a GPU: per-backend layer forms, the precision setting, and the deviceless H100 compile.

The compile tests need the JAX CUDA plugin (``.ci/run`` installs it; elsewhere they are skipped with the
reason). They compile, for the shipped H100 target, a small model's train step, validation and evaluation
cores and one paper config's train step (Moving MNIST at its batch of 128), and assert that every
convolution is a cuDNN call, that the float32 setting computes every convolution and dot in float32, that
the donated state is aliased (no second copy), and that the paper program fits the H100 with the headroom.
"""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from srvp_jax import benchmark, cli, config as config_lib, gpu_check
from srvp_jax.model import abstract_model, backend, layers

TINY = dict(nf=8, nhx=16, nlayers_inf=2, nlayers_res=2, ny=4, nz=4, nh_inf=16, nh_res=16, seq_len=6, nt_cond=2,
            nt_inf=2, batch_size_test=2, val_sample_chunk=3, test_n_samples=4, test_nt_gen=6)
needs_plugin = pytest.mark.skipif(gpu_check.plugin_missing() is not None,
                                  reason=f'deviceless GPU compile: {gpu_check.plugin_missing()}')


def _conv_params(fn, *args):
  """The parameters of every convolution in ``fn``'s jaxpr (traced now: a fresh function each call)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        found.append(eqn.params)
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', value)
        if hasattr(inner, 'eqns'):
          walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found



@pytest.fixture(autouse=True)
def _xla_convolutions(monkeypatch):
  """The XLA layer forms on CPU too (CPU float32 convolutions otherwise run on oneDNN; GPU targets never do)."""
  monkeypatch.setenv('SRVP_ONEDNN', '0')

def test_strided_transposed_convolution_takes_the_form_of_the_target_platform():
  layer = layers.ConvTranspose2d(16, 8, 4, 2, 1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 8, 8, 16))
  cpu = _conv_params(lambda v: layer(v), x)
  with backend.compile_for('gpu'):
    gpu = _conv_params(lambda v: layer(v), x)
    out_gpu = jax.jit(lambda v: layer(v))(x)
  # CPU: four stride-1 phase convolutions; GPU: one lhs-dilated convolution (cuDNN's backward-data kernel).
  assert len(cpu) == 4 and all(p['lhs_dilation'] == (1, 1) for p in cpu)
  assert len(gpu) == 1 and gpu[0]['lhs_dilation'] == (2, 2)
  assert jnp.allclose(out_gpu, layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype,precision,expected', [
    (jnp.float32, 'float32', jax.lax.Precision.HIGHEST), (jnp.float32, 'tensorfloat32', None),
    (jnp.bfloat16, 'float32', None), (jnp.float64, 'float32', jax.lax.Precision.HIGHEST)])
def test_precision_setting_maps_to_lax_precision(dtype, precision, expected):
  assert layers.lax_precision(dtype, precision) == expected
  layer = layers.Conv2d(3, 4, 3, 1, 1, dtype=jnp.float32, precision=precision, rngs=nnx.Rngs(0))
  (params,) = _conv_params(lambda v: layer(v), jnp.ones((1, 8, 8, 3)))
  want = (jax.lax.Precision.HIGHEST,) * 2 if precision == 'float32' else None
  assert params['precision'] == want


def test_precision_config_is_validated():
  assert config_lib.default_config().precision == 'float32'
  config_lib.with_overrides(precision='tensorfloat32')
  with pytest.raises(config_lib.ConfigError, match="precision='tf32'"):
    config_lib.with_overrides(precision='tf32')


def _scans(jaxpr):
  """The ``unroll`` of every scan in a jaxpr (sub-jaxprs included), as (unroll, length) pairs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      found.append((eqn.params['unroll'], eqn.params['length']))
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        found += _scans(inner)
  return found


def test_scans_are_rolled_on_cpus_and_unrolled_for_gpus():
  assert config_lib.default_config().scan_unroll == 0  # The backend's.
  for bad in (-1, False):
    with pytest.raises(config_lib.ConfigError, match='scan_unroll='):
      config_lib.with_overrides(scan_unroll=bad)

  graphdef, state = nnx.split(abstract_model(_tiny()))
  args = (state, jnp.ones((2, 4)), jnp.ones((2, 5, 4)), jnp.ones((2, 6, 16)))

  def scans():  # (unroll, length) of the frame scan (5 frames), its Euler scan (2 steps) and the LSTM (6 frames).
    rollout = lambda st, y0, eps, hx: (nnx.merge(graphdef, st).integrate(y0, eps, 2), nnx.merge(graphdef, st).inf_z(hx))
    return sorted(_scans(jax.make_jaxpr(rollout)(*args).jaxpr))  # A fresh function: traced now.

  assert scans() == [(1, 2), (1, 5), (1, 6)]
  with backend.compile_for('gpu'):
    assert scans() == [(2, 2), (5, 5), (6, 6)]  # Fully unrolled: no loop left.


def test_census_counts_kernels_and_precision():
  hlo = '\n'.join([
      '  %a = (f32[8,4]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward", '
      'operand_precision={highest,highest}',
      '  %b = (f32[8,4]{1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convBackwardInput"',
      '  %c = f32[8,4]{1,0} convolution(%x, %w), window={size=3x3}',
      '  %d = f32[4,16]{1,0} dot(%p, %q), lhs_contracting_dims={1}, operand_precision={highest,highest}',
      '  %e = f32[4,16]{1,0} fusion(%p), kind=kCustom, backend_config={"fusion_backend_config":'
      '{"kind":"__triton_nested_gemm_fusion"}}',
      '  %w = (s32[], f32[4,16]{1,0}) while(%t), condition=%cond, body=%body'])
  c = gpu_check.census(hlo)
  assert c['cudnn_convForward'] == 1 and c['cudnn_convBackwardInput'] == 1 and c['cudnn_convs'] == 2
  assert c['cudnn_convs_highest'] == 1 and c['xla_convs'] == 1 and c['dots'] == c['dots_highest'] == 1
  assert c['gemm_fusions'] == 1 and c['while_loops'] == 1


def test_kernel_launches_count_loop_bodies_by_their_trip_count():
  hlo = '\n'.join([
      '%fused_add (p: f32[4]) -> f32[4] {', '  %p = f32[4]{0} parameter(0)', '  ROOT %a = f32[4]{0} add(%p, %p)', '}',
      '%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {', '  %t = (s32[], f32[4]{0}) parameter(0)',
      '  %x = f32[4]{0} get-tuple-element(%t), index=1', '  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add',
      '  %g = f32[4]{0} custom-call(%f), custom_call_target="__cublas$gemm"',
      '  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %g)', '}',
      '%cond (t: (s32[], f32[4])) -> pred[] {', '  %t = (s32[], f32[4]{0}) parameter(0)',
      '  ROOT %c = pred[] fusion(%t), kind=kLoop, calls=%fused_add', '}',
      'ENTRY %main (x: f32[4]) -> f32[4] {', '  %x = f32[4]{0} parameter(0)',
      '  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add',
      '  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body, '
      'backend_config={"known_trip_count":{"n":"7"},"known_init_step":{"init":"0","step":"1"}}',
      '  ROOT %o = f32[4]{0} get-tuple-element(%w), index=1', '}'])
  # Kernels: the entry's fusion, the body's fusion and GEMM, the condition's fusion (fusion bodies launch none).
  assert gpu_check.launches(hlo) == {'kernels': 4, 'kernel_launches': 1 + 7 * 2 + 8, 'loop_iterations': 7}


def test_shipped_targets_are_the_devices_they_name():
  assert gpu_check.device_memory('h100') == 84942979072  # 79.1 GiB: an H100 SXM's 80 GB.
  assert gpu_check.device_memory('a100') == 85100068864
  for name in gpu_check.TARGETS:
    text = gpu_check.target_config(name)
    fields = [line for line in text.splitlines() if not line.startswith('#')]
    assert text.startswith('# ') and not any('collective_memory_granularity' in f for f in fields)  # jaxlib rejects it.


def _tiny(dtype='float32', precision='float32', **extra):
  return benchmark.load_config('smmnist', batch=4, dtype=dtype, precision=precision, overrides={**TINY, **extra})


def test_benchmark_measures_scan_unrolling_side_by_side_and_records_what_ran():
  assert benchmark.parse_args(['--scan_unroll', '1,full']).scan_unroll == [1, True]
  with pytest.raises(cli.UsageError, match='--scan_unroll'):
    benchmark.parse_args(['--scan_unroll', '0'])
  assert benchmark.parse_args(benchmark.GPU_TABLE['scan_unroll']).scan_unroll == [1, True]
  # What a row records: the config's unrolling, else the backend's.
  assert benchmark.scan_unroll(_tiny()) == 1 and benchmark.scan_unroll(_tiny(), 'gpu') is True
  assert benchmark.scan_unroll(_tiny(scan_unroll=3), 'gpu') == 3


@needs_plugin
def test_small_config_compiles_for_an_h100_with_cudnn_convolutions_in_float32():
  cfg = _tiny()
  train = gpu_check.check_train(cfg)
  c = train.census
  assert c['xla_convs'] == 0 and c['cudnn_convs'] > 0  # Every convolution is a cuDNN call ...
  assert c['cudnn_convForward'] and c['cudnn_convBackwardInput'] and c['cudnn_convBackwardFilter']
  assert c['cudnn_convs_highest'] == c['cudnn_convs'] and c['dots_highest'] == c['dots'] > 0  # ... in float32.
  # The donated state is aliased to the new state: one copy of parameters and optimizer state.
  assert train.alias_bytes >= train.state_bytes > 0
  assert train.fits and train.flops and train.flops > 0
  # The GPU default unrolls the model's scans fully: no loop left in the train step.
  assert train.scan_unroll is True and c['while_loops'] == c['loop_iterations'] == 0
  assert c['kernel_launches'] == c['kernels'] > 0
  for check in (gpu_check.check_val, gpu_check.check_eval):
    r = check(cfg)
    assert r.census['xla_convs'] == 0 and r.census['cudnn_convs'] > 0 and r.fits
    assert r.census['cudnn_convs_highest'] == r.census['cudnn_convs']


@needs_plugin
def test_tensorfloat32_leaves_xla_its_default_precision():
  c = gpu_check.check_val(_tiny(precision='tensorfloat32')).census
  assert c['cudnn_convs'] > 0 and c['dots'] > 0 and c['cudnn_convs_highest'] == 0 and c['dots_highest'] == 0


@needs_plugin
def test_moving_mnist_paper_train_step_fits_an_h100():
  cfg = benchmark.load_config('smmnist', dtype='float32')
  r = gpu_check.check_train(cfg)
  assert r.batch == 128 and r.census['xla_convs'] == 0 and r.census['cudnn_convs'] >= 20
  assert r.alias_bytes >= r.state_bytes
  # Measured 4.8 GiB: far inside 90% of 79.1 GiB (the 10% headroom covers cuDNN workspace and fragmentation).
  assert r.fits and r.peak_bytes < 0.2 * r.device_bytes
  assert 1e12 < r.flops < 5e12  # ~2 TFLOP per step.


@needs_plugin
def test_cli_prints_the_table_and_reports_a_program_that_would_not_fit(tmp_path, monkeypatch, capsys):
  """The command compiles and tabulates; a program above the limit is one error line and exit status 1."""
  out = tmp_path / 'gpu.json'
  argv = ['--target', 'h100', '--programs', 'val', '--configs', 'smmnist', '--batch', '4', '--override',
          ','.join(f'{k}={v}' for k, v in TINY.items()), '--json', str(out)]
  real, reports = gpu_check.CHECKS['val'], []
  monkeypatch.setitem(gpu_check.CHECKS, 'val', lambda *a, **k: reports.append(real(*a, **k)) or reports[-1])
  assert benchmark.main(argv) == 0
  captured = capsys.readouterr()
  assert 'deviceless compile for h100' in captured.out and 'smmnist ' in captured.out and 'error' not in captured.err
  (row,) = json.loads(out.read_text())['rows']
  assert row['program'] == 'val' and row['fits'] and row['census']['xla_convs'] == 0 and row['scan_unroll'] is True

  (compiled,) = reports

  def too_big(cfg, target, label=None):  # The program compiled above (the same command), made too big.
    del cfg
    assert (target, label) == ('h100', compiled.config)
    compiled.temp_bytes = compiled.device_bytes  # As a batch whose activations exceed the device would.
    return compiled

  monkeypatch.setitem(gpu_check.CHECKS, 'val', too_big)
  assert benchmark.main(argv) == 1
  captured = capsys.readouterr()
  assert ' NO ' in captured.out
  errors = captured.err.strip().splitlines()[-1:]
  assert errors[0].startswith('error: smmnist val float32 needs') and '10% headroom' in errors[0]
