"""Tests of the PyTorch speed baseline (srvp_jax.torch_srvp): it does the official computation.

The official state_dict names and shapes of the five paper models
(tests/data/official_state_dict_shapes.json), and a float64 replay of the recorded official runs
tests/data/golden/{dcgan,vgg_skip}/golden64.npz (evaluation forward, prediction, training forward,
losses, every gradient and the BatchNorm statistics after one training pass) to ~1e-10 relative to
each tensor's scale; the float32 program against golden.npz; and the timed training step.
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from srvp_jax import torch_srvp
from srvp_jax.torch_srvp import TorchSRVP

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
GOLDEN = os.path.join(DATA, 'golden')
CASES = ('dcgan', 'vgg_skip')
PAPER = ('smmnist', 'mmnist_deterministic', 'kth', 'human', 'bair')
N_PARAMS = {'smmnist': 10_678_284, 'mmnist_deterministic': 10_678_284, 'kth': 23_877_854, 'human': 23_880_158,
            'bair': 23_847_390}
TOL64 = 1e-10
INPUTS = ('eps_y0', 'eps_z', 'eps_z_post', 'eps_z_prior', 'nt_cond', 'nt_pred', 'skip_frame', 'w_frames')

with open(os.path.join(DATA, 'official_state_dict_shapes.json'), encoding='utf-8') as _f:
  OFFICIAL = json.load(_f)


def rel_err(ours, ref) -> float:
  """max |ours - ref| relative to max |ref| (the tensor's scale)."""
  ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
  ref = np.asarray(ref, dtype=np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = max(float(np.max(np.abs(ref))), 1e-30)
  return float(np.max(np.abs(ours.astype(np.float64) - ref))) / scale


def paper_config(name):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_paper_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def case_config(case):
  with open(os.path.join(GOLDEN, case, 'config.json'), encoding='utf-8') as f:
    return json.load(f)


def load_model(case, dtype):
  model = TorchSRVP(case_config(case), init=False)
  sd = torch.load(os.path.join(GOLDEN, case, 'model.pt'), map_location='cpu', weights_only=True)
  model.load_state_dict(sd, strict=True)
  return model.to(dtype)


def replay(case, dtype, golden_file):
  """Runs everything the golden file records: eval forward, prediction, training forward/backward."""
  cfg = case_config(case)
  with np.load(os.path.join(GOLDEN, case, golden_file)) as f:
    g = dict(f)

  def t(key):
    return torch.from_numpy(g[key]).to(dtype)

  def idx(key):
    return torch.from_numpy(g[key]).long()

  weights = {k: float(cfg[k]) for k in ('obs_scale', 'beta_y', 'beta_z', 'l2_res')}
  n_euler = int(cfg['n_euler_steps'])
  x = t('x')
  res = {}
  # Evaluation mode, all frames observed, evaluation frame choices.
  model = load_model(case, dtype).eval()
  with torch.no_grad():
    out = model(x, t('eval/eps_y0'), t('eval/eps_z'), n_euler_steps=n_euler)
    loss = torch_srvp.loss_terms(x, out, **weights)
  res['eval'] = {'hx': out.hx, 'w': out.w, 'hx_z': out.hx_z, 'x_rec': out.x_rec, 'y': out.y, 'z': out.z,
                 'q_y_0_params': out.q_y_0_params, 'q_z_params': out.q_z_params, 'p_z_params': out.p_z_params,
                 'res': out.res, **{f'skip{i}': s for i, s in enumerate(out.skips or [])},
                 **{f'loss/{k}': v for k, v in loss.items()}}
  # Prediction (official test protocol).
  nt_cond, nt_pred = int(g['pred/nt_cond']), int(g['pred/nt_pred'])
  pred = model.predict(x[:nt_cond], t('pred/eps_y0'), t('pred/eps_z_post'), t('pred/eps_z_prior'), nt_pred,
                       n_euler_steps=n_euler)
  res['pred'] = pred._asdict()
  # Training mode (batch statistics), recorded frame choices, one backward pass.
  model = load_model(case, dtype).train()
  out = model(x, t('train/eps_y0'), t('train/eps_z'), idx('train/w_frames'), idx('train/skip_frame'), n_euler)
  loss = torch_srvp.loss_terms(x, out, **weights)
  loss['loss'].backward()
  res['train'] = {'x_rec': out.x_rec, **{f'loss/{k}': v for k, v in loss.items()}}
  res['grad'] = {name: p.grad for name, p in model.named_parameters()}
  res['bn_after'] = {name: b for name, b in model.named_buffers() if 'running' in name}
  return res, g


@pytest.fixture(scope='module', params=CASES)
def replay64(request):
  return request.param, *replay(request.param, torch.float64, 'golden64.npz')


def is_input_or_nested(key):
  """Recorded inputs (noise, frame choices, lengths) and the train/grad, train/bn_after groups."""
  return key in INPUTS or key.startswith(('grad/', 'bn_after/'))


def check(ours, g, prefix, tol):
  """Every recorded ``prefix/<key>`` against ``ours[key]``; returns the max relative error."""
  keys = [k for k in g if k.startswith(prefix) and not is_input_or_nested(k[len(prefix):])]
  assert keys and {k[len(prefix):] for k in keys} == set(ours), (sorted(keys), sorted(ours))
  errs = {k: rel_err(ours[k[len(prefix):]], g[k]) for k in keys}
  bad = {k: e for k, e in errs.items() if not e <= tol}
  assert not bad, bad
  return max(errs.values())


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', PAPER)
def test_paper_state_dict_is_official(name):
  cfg = paper_config(name)
  model = TorchSRVP(cfg, init=False)
  ref = OFFICIAL[name]
  assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(ref['state_dict'].items())
  assert torch_srvp.param_count(model) == ref['n_params'] == N_PARAMS[name]


@pytest.mark.parametrize('case', CASES)
def test_official_checkpoint_loads_strict(case):
  model = load_model(case, torch.float32)
  sd = torch.load(os.path.join(GOLDEN, case, 'model.pt'), map_location='cpu', weights_only=True)
  assert list(model.state_dict()) == list(sd)
  bad = dict(sd)
  bad.pop(next(iter(bad)))
  with pytest.raises(RuntimeError):
    TorchSRVP(case_config(case), init=False).load_state_dict(bad, strict=True)


def test_initialisation_is_official():
  cfg = dict(nc=1, nf=8, nhx=16, ny=6, nz=4, nt_inf=2, nh_inf=16, nh_res=24, nlayers_res=3, archi='vgg', skipco=True,
             res_gain=1.2)
  torch.manual_seed(0)
  model = TorchSRVP(cfg)
  sd = model.state_dict()
  conv = torch.cat([v.flatten() for k, v in sd.items() if k.startswith(('encoder.', 'decoder.')) and v.dim() == 4])
  assert abs(conv.mean().item()) < 2e-3 and abs(conv.std().item() - 0.02) < 1e-3
  bn_w = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
  bn_b = torch.cat([m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])
  assert abs(bn_w.mean().item() - 1) < 5e-3 and bn_w.std().item() < 0.03 and not bn_b.any()
  for k, v in sd.items():
    if k.startswith('dynamics.') and k.endswith('weight'):  # orthogonal with gain res_gain
      w = v / 1.2
      gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
      torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    elif k.startswith('dynamics.'):
      assert not v.any()
  bound = 1 / math.sqrt(16)
  assert sd['q_z.weight'].abs().max() <= bound and sd['inf_z.weight_hh_l0'].abs().max() <= bound


def test_eval_forward_matches_official_float64(replay64):
  _, res, g = replay64
  print('eval max rel err', check(res['eval'], g, 'eval/', TOL64))


def test_prediction_matches_official_float64(replay64):
  _, res, g = replay64
  print('pred max rel err', check(res['pred'], g, 'pred/', TOL64))


def test_train_forward_and_losses_match_official_float64(replay64):
  _, res, g = replay64
  print('train max rel err', check(res['train'], g, 'train/', TOL64))


def test_gradients_match_official_float64(replay64):
  _, res, g = replay64
  print('grad max rel err', check(res['grad'], g, 'train/grad/', TOL64))


def test_batchnorm_statistics_match_official_float64(replay64):
  _, res, g = replay64
  print('bn_after max rel err', check(res['bn_after'], g, 'train/bn_after/', TOL64))


@pytest.mark.parametrize('case', CASES)
def test_float32_program_matches_official(case):
  """golden.npz (float32): forward values and losses ~1e-5; gradients too for DCGAN (README)."""
  res, g = replay(case, torch.float32, 'golden.npz')
  for prefix, tol in (('eval/', 1e-5), ('pred/', 1e-5), ('train/', 1e-5)):
    check(res[prefix[:-1]], g, prefix, tol)
  if case == 'dcgan':
    check(res['grad'], g, 'train/grad/', 1e-4)


# ------------------------------------------------------------------------------------------------
TINY = dict(nc=3, nf=4, nhx=8, ny=4, nz=3, nt_inf=2, nh_inf=8, nlayers_inf=3, nh_res=8, nlayers_res=3, archi='vgg',
            skipco=True, res_gain=1.2, n_euler_steps=2, obs_scale=0.5, beta_y=1.0, beta_z=1.0, l2_res=1.0)


@pytest.mark.parametrize('archi', ['dcgan', 'vgg'])
def test_train_step_runs(archi):
  torch.manual_seed(0)
  cfg = dict(TINY, archi=archi, skipco=archi == 'vgg')
  model = TorchSRVP(cfg)
  before = {k: v.clone() for k, v in model.state_dict().items()}
  step = torch_srvp.make_train_step(model, cfg)
  x = torch.rand(4, 2, 3, 64, 64)
  losses = [step(x) for _ in range(2)]
  assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
  after = model.state_dict()
  assert all(not torch.equal(before[k], after[k]) for k, _ in model.named_parameters())
  assert after['decoder.first_upconv.' + ('0.' if archi == 'vgg' else '') + '1.num_batches_tracked'] == 2


def test_euler_loop_exact_for_any_number_of_steps():
  """Three Euler steps per frame: every frame decoded, z and its prior drawn once per frame."""
  torch.manual_seed(0)
  model = TorchSRVP(dict(TINY, archi='dcgan', skipco=False)).double().eval()
  nt, bsz = 4, 2
  x = torch.rand(nt, bsz, 3, 64, 64, dtype=torch.float64)
  eps_y0, eps_z = torch.randn(bsz, 4, dtype=torch.float64), torch.randn(nt - 1, bsz, 3, dtype=torch.float64)
  with torch.no_grad():
    out = model(x, eps_y0, eps_z, n_euler_steps=3)
    assert out.x_rec.shape == x.shape and out.y.shape == (nt, bsz, 4) and out.res.shape == (3 * (nt - 1), bsz, 4)
    assert out.z.shape == out.q_z_params.shape[:2] + (3,) and out.p_z_params.shape == (nt - 1, bsz, 6)
    for t in range(1, nt):
      y = out.y[t - 1]  # The model's state at frame t - 1 (a recomputed one may differ in its last bit).
      z = torch_srvp.rsample(out.q_z_params[t - 1], eps_z[t - 1])
      torch.testing.assert_close(model.p_z(y), out.p_z_params[t - 1], rtol=0, atol=0)
      for k in range(3):
        r = model.dynamics(torch.cat([y, z], 1)) / 3
        torch.testing.assert_close(r, out.res[3 * (t - 1) + k], rtol=0, atol=1e-15)
        y = y + r
      torch.testing.assert_close(y, out.y[t], rtol=0, atol=1e-14)
