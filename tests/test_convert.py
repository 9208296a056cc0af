"""Tests of the official <-> ours checkpoint conversion (srvp_jax.convert and convert_torch_ckpt.py).

The paper architectures are checked against the tensor list of real official checkpoints
(tests/data/official_state_dict_shapes.json); the converter CLI against an official checkpoint
(tests/data/golden/dcgan).
"""

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import convert_torch_ckpt
from srvp_jax import checkpoints, convert
from srvp_jax import config as config_lib
from srvp_jax.model import param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
GOLDEN_DCGAN = os.path.join(DATA, 'golden', 'dcgan')
with open(os.path.join(DATA, 'official_state_dict_shapes.json'), encoding='utf-8') as _f:
  OFFICIAL = json.load(_f)

# docs/srvp.md section 1: the paper configurations (model sizes nf, nhx, nh_inf, ... are the defaults).
PAPER = {
    'smmnist': dict(dataset='smmnist', nc=1, ny=20, nz=20, archi='dcgan', skipco=False, n_euler_steps=1, nt_inf=5,
                    nt_cond=5, obs_scale=1.0, beta_z=2.0, res_gain=1.41, batch_size=128, seq_len=15),
    'mmnist_deterministic': dict(dataset='mmnist', nc=1, ny=20, nz=20, archi='dcgan', skipco=False, n_euler_steps=1,
                                 nt_inf=5, nt_cond=5, obs_scale=1.0, beta_z=2.0, res_gain=1.41, batch_size=128,
                                 seq_len=15),
    'kth': dict(dataset='kth', nc=1, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=3, nt_cond=10,
                obs_scale=0.2, beta_z=1.0, res_gain=1.2, batch_size=100, seq_len=20),
    'human': dict(dataset='human', nc=3, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=3,
                  nt_cond=8, obs_scale=0.2, beta_z=1.0, res_gain=1.2, batch_size=100, seq_len=16),
    'bair': dict(dataset='bair', nc=3, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=2, nt_cond=2,
                 obs_scale=0.71, beta_z=1.0, res_gain=1.41, batch_size=192, seq_len=12),
}
DEFAULT_SIZES = dict(nx=64, nf=64, nhx=128, nh_inf=256, nlayers_inf=3, nh_res=512, nlayers_res=4)


def paper_config(name):
  cfg = config_lib.default_config()
  cfg.update(PAPER[name])
  config_lib.validate(cfg)
  return cfg


@functools.lru_cache(maxsize=None)
def paper_model(name):
  """The full-size paper model, zero-filled (no random initialisation: its values are not used)."""
  return convert_torch_ckpt.blank_model(paper_config(name))


def official_shapes(name):
  return {k: tuple(v) for k, v in OFFICIAL[name]['state_dict'].items()}


def random_state_dict(shapes, seed):
  """A state_dict with exactly the official names, shapes and dtypes, and random values."""
  rng = np.random.default_rng(seed)
  return {k: (rng.integers(0, 10**6, size=s, dtype=np.int64) if k.endswith('num_batches_tracked')
              else rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


def assert_same_state_dict(ours, ref):
  assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:5]
  for k, v in ref.items():
    got = np.asarray(ours[k])
    assert got.dtype == np.asarray(v).dtype, (k, got.dtype, np.asarray(v).dtype)
    assert got.shape == np.shape(v), (k, got.shape, np.shape(v))
    assert np.array_equal(got, v), k


# ------------------------------------------------------------------------------------------------
# The paper architectures against real official checkpoints.
def test_paper_configs_use_default_model_sizes():
  cfg = config_lib.default_config()
  assert {k: cfg[k] for k in DEFAULT_SIZES} == DEFAULT_SIZES
  assert set(PAPER) == set(OFFICIAL)


@pytest.mark.parametrize('name', sorted(PAPER))
def test_paper_model_matches_official_state_dict(name):
  model = paper_model(name)
  assert param_count(model) == OFFICIAL[name]['n_params']
  expected = official_shapes(name)
  ours = convert.expected_shapes(model)
  assert ours == expected, sorted(set(ours.items()) ^ set(expected.items()))[:5]
  assert expected[next(k for k in expected if k.endswith('num_batches_tracked'))] == ()
  # Every variable of the model (parameters and BatchNorm statistics) has an official name.
  assert len(jax.tree_util.tree_leaves(nnx.state(model))) == len(expected)


@pytest.mark.parametrize('name', ['smmnist', 'kth'])
def test_state_dict_order_is_official(name):
  # Same order as torch's state_dict (torch.nn.LSTM: weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0).
  assert list(convert.expected_shapes(paper_model(name))) == list(OFFICIAL[name]['state_dict'])


@pytest.mark.parametrize('name', sorted(PAPER))
def test_random_state_dict_round_trip(name, tmp_path):
  shapes = official_shapes(name)
  sd = random_state_dict(shapes, seed=len(name))
  model = convert.load_state_dict(paper_model(name), sd, paper_config(name))
  back = convert.state_dict_from_model(model)
  assert_same_state_dict(back, sd)
  path = str(tmp_path / 'model.pt')
  convert.save_torch_file(back, path)
  assert_same_state_dict(convert.load_torch_file(path), sd)
  raw = torch.load(path, map_location='cpu', weights_only=True)
  assert all(isinstance(v, torch.Tensor) for v in raw.values())


# ------------------------------------------------------------------------------------------------
# The CLI on an official checkpoint.
def run_cli(*args):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'convert_torch_ckpt.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def golden_state_dict():
  return convert.load_torch_file(os.path.join(GOLDEN_DCGAN, 'model.pt'))


def golden_official_config():
  with open(os.path.join(GOLDEN_DCGAN, 'config.json'), encoding='utf-8') as f:
    return json.load(f)


def _main(capsys, *args):
  """convert_torch_ckpt.py's main in this process (the process-level errors: run_cli, below) -> (status, stdout,
  stderr)."""
  rc = convert_torch_ckpt.main(list(args))
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def test_cli_round_trip_on_official_checkpoint(tmp_path, capsys, monkeypatch):
  ref = golden_state_dict()
  n_params = sum(v.size for k, v in ref.items() if not k.split('.')[-1].startswith(('running', 'num_batches')))
  ours_dir, back_dir = str(tmp_path / 'ours'), str(tmp_path / 'back')

  monkeypatch.chdir(ROOT)
  rc, out, err = _main(capsys, 'tests/data/golden/dcgan', '--out', ours_dir)
  assert rc == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 1 and f'{n_params:,} parameters' in lines[0] and 'dcgan' in lines[0] and ours_dir in lines[0]

  model, cfg, step = checkpoints.load_model(ours_dir, 'latest')  # What evaluation / fine-tuning call.
  assert step == 0
  assert_same_state_dict(convert.state_dict_from_model(model), ref)
  for which in ('best', '0'):  # The same loader without the (slow, eager) random initialisation.
    model, cfg, step = checkpoints.load_model(ours_dir, which)
    assert step == 0
    assert_same_state_dict(convert.state_dict_from_model(model), ref)
  official = golden_official_config()
  assert all(cfg[k] == official[k] for k in config_lib.MODEL_KEYS + ('n_euler_steps', 'obs_scale', 'beta_z'))

  rc, out, err = _main(capsys, ours_dir, '--to_torch', '--out', back_dir)
  assert rc == 0, err
  assert len(out.strip().splitlines()) == 1 and os.path.join(back_dir, 'model.pt') in out
  raw = torch.load(os.path.join(back_dir, 'model.pt'), map_location='cpu', weights_only=True)
  ref_raw = torch.load(os.path.join(GOLDEN_DCGAN, 'model.pt'), map_location='cpu', weights_only=True)
  assert set(raw) == set(ref_raw)
  for k, v in ref_raw.items():
    assert raw[k].dtype == v.dtype and raw[k].shape == v.shape and torch.equal(raw[k], v), k
  with open(os.path.join(back_dir, 'config.json'), encoding='utf-8') as f:
    exported = json.load(f)
  for k in config_lib.MODEL_KEYS + ('n_euler_steps', 'obs_scale', 'beta_y', 'beta_z', 'l2_res', 'res_gain',
                                    'dataset', 'seq_len', 'nt_cond', 'deterministic'):
    assert exported[k] == official[k], k


def test_checkpoint_and_config_flags_model_name_and_ddp_prefix(tmp_path):
  ref = golden_state_dict()
  # An experiment folder with model_best.pt, saved from DistributedDataParallel ('module.' prefixes).
  xp = tmp_path / 'xp'
  xp.mkdir()
  shutil.copy(os.path.join(GOLDEN_DCGAN, 'config.json'), xp / 'config.json')
  convert.save_torch_file({f'module.{k}': v for k, v in ref.items()}, str(xp / 'model_best.pt'))
  assert convert_torch_ckpt.main([str(xp), '--model_name', 'model_best.pt', '--out', str(tmp_path / 'a')]) == 0
  assert convert_torch_ckpt.main(['--checkpoint', os.path.join(GOLDEN_DCGAN, 'model.pt'), '--config',
                                  os.path.join(GOLDEN_DCGAN, 'config.json'), '--out', str(tmp_path / 'b')]) == 0
  for d in ('a', 'b'):
    model, _, _ = checkpoints.load_model(str(tmp_path / d), 'best')
    assert_same_state_dict(convert.state_dict_from_model(model), ref)
  for which in ('latest', '0'):
    out = str(tmp_path / f'export_{which}')
    assert convert_torch_ckpt.main([str(tmp_path / 'a'), '--to_torch', '--checkpoint', which, '--out', out]) == 0
    assert_same_state_dict(convert.load_torch_file(os.path.join(out, 'model.pt')), ref)
    assert config_lib.load_official_json(os.path.join(out, 'config.json')) == checkpoints.RunFolder(
        str(tmp_path / 'a')).load_config()


# ------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, no traceback.
class Evil:
  """Unpickling this runs code (creates a folder): weights_only loading must refuse it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.makedirs, (self.marker,)


def make_xp(tmp_path, state_dict=None, config_edit=None, model_bytes=None):
  """An official experiment folder built from the golden dcgan one, optionally broken."""
  xp = tmp_path / 'xp'
  xp.mkdir(exist_ok=True)
  official = golden_official_config()
  if config_edit is not None:
    official = config_edit(official)
  if official is not None:
    (xp / 'config.json').write_text(json.dumps(official))
  if model_bytes is not None:
    (xp / 'model.pt').write_bytes(model_bytes)
  elif state_dict is not None:
    convert.save_torch_file(state_dict, str(xp / 'model.pt'))
  return str(xp)


def edited(fn):
  def edit(d):
    d = dict(d)
    fn(d)
    return d
  return edit


def _missing(sd):
  del sd['q_z.weight'], sd['encoder.conv.1.1.running_var']
  return sd


def _unexpected(sd):
  sd['extra.weight'] = np.zeros(3, np.float32)
  return sd


def _wrong_shape(sd):
  sd['q_z.bias'] = np.zeros(5, np.float32)
  return sd


def _counter_overflow(sd):
  sd['encoder.conv.1.1.num_batches_tracked'] = np.array(2**40, np.int64)
  return sd


def _evil_torch_bytes(tmp_path):
  path = tmp_path / 'evil.pt'
  torch.save({'w': torch.zeros(2), 'x': Evil(str(tmp_path / 'pwned'))}, str(path))
  return path.read_bytes()


def _evil_pickle_bytes(tmp_path):
  return pickle.dumps({'w': Evil(str(tmp_path / 'pwned'))})


def _list_bytes(tmp_path):
  path = tmp_path / 'list.pt'
  torch.save([torch.zeros(2)], str(path))
  return path.read_bytes()


def _wrong_rank(sd):
  sd = dict(sd)
  sd['q_z.weight'] = sd['q_z.weight'][None]  # A tensor with one dimension too many.
  return sd


ERROR_CASES = {
    'wrong_rank': (dict(sd=_wrong_rank), ['q_z.weight', '(1, 12, 32)', '(12, 32)']),
    'missing_keys': (dict(sd=_missing), ['missing keys', 'q_z.weight', 'encoder.conv.1.1.running_var']),
    'unexpected_keys': (dict(sd=_unexpected), ['unexpected keys', 'extra.weight']),
    'wrong_shape': (dict(sd=_wrong_shape), ['q_z.bias', '(5,)', '(12,)']),
    'counter_overflow': (dict(sd=_counter_overflow), ['encoder.conv.1.1.num_batches_tracked', str(2**40)]),
    'shape_contradicts_config': (dict(cfg=edited(lambda d: d.update(nz=7))),
                                 ['q_z.weight', '(12, 32)', '(14, 32)', 'nz=7']),
    'unknown_architecture': (dict(cfg=edited(lambda d: d.update(archi='resnet'))),
                             ['unknown architecture', "'resnet'"]),
    'missing_config_keys': (dict(cfg=edited(lambda d: [d.pop('nz'), d.pop('archi')])),
                            ["lacks the model option(s) ['nz', 'archi']"]),
    'config_not_json': (dict(cfg_text='{not json'), ['config.json is not a JSON config']),
    'random_bytes': (dict(bytes=lambda p: np.random.default_rng(0).bytes(4096)),
                     ['model.pt is not a loadable PyTorch checkpoint']),
    'code_running_torch_file': (dict(bytes=_evil_torch_bytes), ['model.pt is not a loadable PyTorch checkpoint']),
    'code_running_pickle': (dict(bytes=_evil_pickle_bytes), ['model.pt is not a loadable PyTorch checkpoint']),
    'not_a_state_dict': (dict(bytes=_list_bytes), ['does not hold a state_dict']),
    'missing_model_file': (dict(no_model=True), ['checkpoint file not found', 'model.pt']),
    'missing_config_file': (dict(cfg=lambda d: None), ['config file not found', 'config.json']),
}


@pytest.mark.parametrize('case', sorted(ERROR_CASES))
def test_conversion_errors(case, tmp_path, capsys):
  spec, needles = ERROR_CASES[case]
  sd = golden_state_dict()
  if 'sd' in spec:
    sd = spec['sd'](sd)
  xp = make_xp(tmp_path, state_dict=None if spec.get('no_model') else sd, config_edit=spec.get('cfg'),
               model_bytes=spec['bytes'](tmp_path) if 'bytes' in spec else None)
  if 'cfg_text' in spec:
    with open(os.path.join(xp, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(spec['cfg_text'])
  capsys.readouterr()
  rc = convert_torch_ckpt.main([xp, '--out', str(tmp_path / 'out')])
  out, err = capsys.readouterr()
  assert rc == 2 and out == ''
  assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
  for needle in needles:
    assert needle in err, (needle, err)
  assert not (tmp_path / 'pwned').exists()
  assert not (tmp_path / 'out' / checkpoints.CHECKPOINT_DIR).exists()


def test_export_and_usage_errors(tmp_path, capsys):
  converted = str(tmp_path / 'ours')
  assert convert_torch_ckpt.main([GOLDEN_DCGAN, '--out', converted]) == 0
  cases = [
      ([str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o')], ['experiment folder not found', 'nowhere']),
      ([str(tmp_path / 'nowhere'), '--to_torch', '--out', str(tmp_path / 'o')], ['checkpoint folder not found']),
      ([str(tmp_path), '--to_torch', '--out', str(tmp_path / 'o')], ['neither srvp_config.json nor config.json']),
      ([GOLDEN_DCGAN, '--to_torch', '--out', str(tmp_path / 'o')], ['already an official experiment folder']),
      ([converted, '--to_torch', '--checkpoint', '7', '--out', str(tmp_path / 'o')],
       ['no checkpoint for step 7', 'available: [0]']),
      ([GOLDEN_DCGAN, '--out', str(tmp_path)], ['not an earlier output of convert_torch_ckpt.py', 'ours',
                                                 '--overwrite']),
      (['--out', str(tmp_path / 'o')], ['give XP_DIR, or both --checkpoint PATH and --config PATH']),
      ([GOLDEN_DCGAN, '--config', 'c.json', '--out', str(tmp_path / 'o')], ['not both']),
  ]
  capsys.readouterr()
  for argv, needles in cases:
    rc = convert_torch_ckpt.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == '', (argv, out)
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), (argv, err)
    for needle in needles:
      assert needle in err, (argv, needle, err)
  assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('make_bytes', [_evil_torch_bytes, _evil_pickle_bytes])
def test_cli_refuses_code_running_checkpoint_without_traceback(tmp_path, make_bytes):
  # A subprocess: stderr as a user sees it (no warning lines from torch.load either).
  xp = make_xp(tmp_path, model_bytes=make_bytes(tmp_path))
  rc, out, err = run_cli(xp, '--out', str(tmp_path / 'out'))
  assert rc == 2 and out == ''
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
  assert err.startswith('error: ') and 'not a loadable PyTorch checkpoint' in err
  assert not (tmp_path / 'pwned').exists()
