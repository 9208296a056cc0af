"""The evaluation library: the shared best-of-N core, chunk sizing, the test protocol, the paper comparison."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from srvp_jax import config as config_lib
from srvp_jax import evaluate, evaluation, sharding
from srvp_jax.evaluation import report, sampling
from srvp_jax.model import build_model
from srvp_jax.train import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from test_evaluate import (TINY, _one_error_line, mmnist_dir, tiny_ckpt,  # noqa: E402,F401 pylint: disable=wrong-import-position,unused-import
                           write_checkpoint_folder)
from helpers import on_four_devices  # noqa: E402 pylint: disable=wrong-import-position,wrong-import-order


def _tiny_model(seed=0, **overrides):
  cfg = config_lib.with_overrides(**{**TINY, **overrides})
  return build_model(cfg, jax.random.key(seed)), cfg


def test_paper_configs_carry_the_paper_test_protocol():
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import importlib  # pylint: disable=import-outside-toplevel
  expected = {'smmnist': (5, 25, 100, 'latest'), 'mmnist_deterministic': (5, 100, 1, 'latest'),
              'kth': (10, 40, 100, 'best'), 'human': (8, 53, 100, 'best'), 'bair': (2, 30, 100, 'latest')}
  for name, (nt_cond, nt_gen, n_samples, which) in expected.items():
    cfg = importlib.import_module(name).get_config()
    assert config_lib.test_protocol(cfg) == dict(nt_cond=nt_cond, nt_gen=nt_gen, n_samples=n_samples,
                                                 checkpoint=which), name
  # A config without protocol keys (e.g. an official config.json) falls back to the paper's for its dataset.
  official_kth = config_lib.with_overrides(dataset='kth', nt_cond=10)
  assert config_lib.test_protocol(official_kth)['nt_gen'] == 40
  with pytest.raises(config_lib.ConfigError, match='test_checkpoint'):
    config_lib.with_overrides(test_checkpoint='final')


def test_evaluate_defaults_come_from_the_checkpoint_config(tmp_path, mmnist_dir):  # pylint: disable=redefined-outer-name
  """No option: nt_gen, samples and checkpoint are the config's protocol (here 5 frames, 3 samples, best)."""
  ckpt = str(tmp_path / 'ckpt')
  cfg = config_lib.with_overrides(**TINY, test_nt_gen=5, test_n_samples=3, test_checkpoint='best')
  write_checkpoint_folder(ckpt, cfg, steps=(4,), best_steps=(2,))
  out = str(tmp_path / 'out')
  assert evaluate.main([ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr', '--out', out, '--no_progress',
                        '--n_show', '0']) == 0
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    res = json.load(f)
  assert res['options']['nt_gen'] == 5 and res['options']['n_samples'] == 3
  assert res['checkpoint']['which'] == 'best' and res['checkpoint']['step'] == 2
  assert res['comparison'] is None  # Not the paper's protocol (5 frames): no paper numbers beside ours.


def test_compare_official_file_in_results_and_table(tmp_path, tiny_ckpt, mmnist_dir, capsys):  # pylint: disable=redefined-outer-name
  ref = tmp_path / 'paper.json'
  ref.write_text(json.dumps({'psnr': {'mean': 1000.0, 'interval95': 0.5}, 'ssim': 0.0}))
  out = str(tmp_path / 'out')
  assert evaluate.main([tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr,ssim', '--nt_gen', '5',
                        '--n_samples', '2', '--compare_official', str(ref), '--out', out, '--no_progress',
                        '--n_show', '0']) == 0
  table = capsys.readouterr().out
  with open(os.path.join(out, 'results.json'), encoding='utf-8') as f:
    comparison = json.load(f)['comparison']
  assert comparison['source'] == str(ref)
  psnr = comparison['metrics']['psnr']
  assert psnr['reference'] == 1000.0 and psnr['reference_interval95'] == 0.5
  assert psnr['difference'] == pytest.approx(psnr['ours'] - 1000.0) and psnr['intervals_overlap'] is False
  assert comparison['metrics']['ssim']['reference'] == 0.0
  assert 'reference' in table and 'NO' in table
  bad = tmp_path / 'bad.json'
  bad.write_text('{"psnr": "high"}')
  assert evaluate.main([tiny_ckpt, '--data_dir', mmnist_dir, '--compare_official', str(bad)]) == 2
  assert 'numeric "mean"' in _one_error_line(capsys)


def test_compare_intervals():
  ours = {'psnr': {'mean': 20.0, 'interval95': 0.2}}
  ref = {'psnr': {'mean': 20.3, 'interval95': 0.15}, 'lpips': {'mean': 0.1, 'interval95': 0.01}}
  rows = report.compare(ours, ref, 'paper')['metrics']
  assert list(rows) == ['psnr'] and rows['psnr']['intervals_overlap'] is True
  assert report.compare({'psnr': {'mean': 20.0, 'interval95': 0.1}}, ref, 'p')['metrics']['psnr'][
      'intervals_overlap'] is False
  assert set(report.PAPER_RESULTS) <= set(config_lib.PAPER_TEST)


def test_chunk_size_from_the_compiled_programs_memory_analysis():
  model, cfg = _tiny_model()
  graphdef, state = nnx.split(model)
  protocol = sampling.Protocol(nt_cond=2, nt_pred=3, n_euler_steps=1, cond_euler_steps=1, metrics=('psnr',))
  scorer = sampling.BestOfN(graphdef, protocol)
  states = sharding.replicate((state,), scorer.mesh)
  assert scorer.chunk_size(states, 4, (64, 64, 1), 100, free_bytes=1) == 1  # Nothing free: one at a time.
  assert scorer.chunk_size(states, 4, (64, 64, 1), 100, free_bytes=1 << 40) == 100  # Everything fits.
  k = scorer.chunk_size(states, 4, (64, 64, 1), 100)  # This machine's free memory.
  assert 1 <= k <= 100
  # Balanced: 100 samples that fit by 40 run as 3 chunks of 34, not 40 + 40 + 20.
  fn = sampling.chunk_function(graphdef, protocol, scorer.mesh)
  key_data = jax.random.key_data(jax.random.key(0))
  probe = fn.lower(states, jax.ShapeDtypeStruct(key_data.shape, key_data.dtype),
                   jax.ShapeDtypeStruct((4, 5, 64, 64, 1), np.float32),
                   jax.ShapeDtypeStruct((4,), np.int32), jax.ShapeDtypeStruct((4,), np.int32),
                   jax.ShapeDtypeStruct((), np.int32)).compile().memory_analysis()
  per_sample = (probe.temp_size_in_bytes + probe.output_size_in_bytes) / 4
  assert scorer.chunk_size(states, 4, (64, 64, 1), 100, free_bytes=int(40 * per_sample)) == 34
  assert cfg.nc == 1


def test_validation_and_evaluation_share_the_core():
  """Validation's best-of-N (select on all frames) and the test protocol's (select on predicted frames) agree
  with a direct computation from the same per-sample predictions."""
  model, _ = _tiny_model()
  graphdef, state = nnx.split(model)
  x = np.random.default_rng(1).uniform(size=(3, 6, 64, 64, 1)).astype(np.float32)
  key = jax.random.key(4)
  common = dict(nt_cond=2, nt_pred=4, n_euler_steps=1, cond_euler_steps=1, metrics=('psnr',))
  full = sampling.predictions(model, sampling.Protocol(select_on='all', **common), key, x, np.arange(3),
                              np.arange(5), 5)
  expected = np.asarray(full['psnr']).mean(-1)[np.argmax(np.asarray(full['select_psnr']), axis=0), np.arange(3)]
  val = sampling.BestOfN(graphdef, sampling.Protocol(select_on='all', keep_videos=False, **common))
  got = sampling.validation_psnr(val, sharding.replicate((state,), val.mesh), x, key, n_samples=5, chunk=2)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  test = sampling.BestOfN(graphdef, sampling.Protocol(**common))
  res = jax.device_get(test.run_batch(sharding.replicate((state,), test.mesh), x, np.arange(3), key, n_samples=5, chunk=3))
  pred_score = np.asarray(full['psnr']).mean(-1)
  np.testing.assert_allclose(res['selection']['psnr']['best_value'], pred_score.max(0), rtol=1e-5)


def dp_validation_psnr():
  """The validation PSNR of 6 videos on all the devices of this process (padded to a multiple of them): the PSNR,
  the device count and the number of devices the result is sharded over."""
  cfg = config_lib.with_overrides(**TINY, val_sample_chunk=2)
  model = build_model(cfg, 0)
  graphdef, params, stats = nnx.split(model, nnx.Param, ...)
  mesh = sharding.make_mesh(cfg)
  params, stats = sharding.replicate((params, stats), mesh)
  x = np.random.default_rng(0).uniform(size=(6, 6, 64, 64, 1)).astype(np.float32)
  psnr = validation.make_batch_psnr(graphdef, cfg, 3, mesh)(params, stats, x, jax.random.key(1))
  return dict(psnr=np.asarray(psnr), n_dev=jax.device_count(), n_shards=len(psnr.sharding.device_set))


def test_validation_is_data_parallel_and_equal_on_1_and_4_devices(tmp_path):
  """6 videos on 4 devices (padded to 8): sharded over the mesh, same PSNR as on one device (this process)."""
  out = {1: dp_validation_psnr(), 4: on_four_devices('test_evaluation', 'dp_validation_psnr', tmp_path)}
  assert int(out[4]['n_dev']) == 4 and int(out[4]['n_shards']) == 4 and int(out[1]['n_dev']) == 1
  assert out[1]['psnr'].shape == (6,)
  np.testing.assert_allclose(out[1]['psnr'], out[4]['psnr'], rtol=1e-5)


def test_corrupt_lpips_backbone_is_one_line(tmp_path, tiny_ckpt, mmnist_dir, capsys):  # pylint: disable=redefined-outer-name
  bad = tmp_path / 'alexnet-owt-7be5be79.pth'
  bad.write_bytes(b'not a torch file' * 100)
  assert evaluate.main([tiny_ckpt, '--data_dir', mmnist_dir, '--metrics', 'psnr,lpips', '--nt_gen', '5',
                        '--lpips_backbone', str(bad)]) == 2
  line = _one_error_line(capsys)
  assert str(bad) in line and 'download it again' in line


def test_runner_reports_the_chunk_it_used():
  model, _ = _tiny_model()
  videos = np.random.default_rng(0).integers(0, 256, (2, 5, 64, 64, 1), dtype=np.uint8)
  res = evaluation.evaluate_videos(model, videos, nt_cond=2, n_samples=3, n_euler_steps=1, batch_size=2, seed=0,
                                   metrics=('psnr',), progress=False)
  assert 1 <= res['sample_chunk'] <= 3 and res['best_value']['psnr'].shape == (2,)
