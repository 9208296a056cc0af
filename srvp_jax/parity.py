"""Replays data recorded with the official PyTorch code and compares our model with it.

    python -m srvp_jax.parity GOLDEN_DIR [GOLDEN_DIR ...]

GOLDEN_DIR holds ``model.pt``, ``config.json`` and ``golden.npz`` laid out as
``shared/reference/README.md`` describes (any configuration). Every recorded computation is
replayed on CPU in float32: evaluation mode, the test-time prediction protocol, and one training
pass with gradients and the BatchNorm statistics after it. One line is printed per quantity with
its max absolute and relative error (relative to the reference's largest magnitude); the exit
status is non-zero when any quantity exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Iterator

import numpy as np

# Tolerances of shared/reference/README.md (relative to each tensor's scale).
TOLERANCES = {'forward': 1e-5, 'loss': 1e-5, 'grad': 1e-4}


@dataclasses.dataclass
class Comparison:
  name: str
  kind: str
  abs_err: float
  rel_err: float

  @property
  def ok(self) -> bool:
    return self.rel_err <= TOLERANCES[self.kind]


def compare(name: str, kind: str, ours, ref) -> Comparison:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{name}: shape {ours.shape} differs from the reference {ref.shape}')
  abs_err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return Comparison(name, kind, abs_err, abs_err / max(scale, 1e-12))


def _tbchw(a):
  """Our (B, T, H, W, C) -> official (T, B, C, H, W)."""
  return np.transpose(np.asarray(a), (1, 0, 4, 2, 3))


def _tb(a):
  """Our (B, T, ...) -> official (T, B, ...)."""
  return np.swapaxes(np.asarray(a), 0, 1)


PARTS = ('eval', 'pred', 'train')


def replay(golden_dir: str, parts: tuple[str, ...] = PARTS) -> Iterator[Comparison]:
  """Yields one comparison per recorded quantity of ``golden_dir`` (of the recorded ``parts``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from srvp_jax import convert, objective  # pylint: disable=import-outside-toplevel
  from srvp_jax.model import PredNoise, TrainNoise  # pylint: disable=import-outside-toplevel

  for f in ('model.pt', 'config.json', 'golden.npz'):
    if not os.path.isfile(os.path.join(golden_dir, f)):
      raise FileNotFoundError(f'{golden_dir} lacks {f}: expected model.pt, config.json and golden.npz')
  model, cfg = convert.load_official(os.path.join(golden_dir, 'model.pt'), os.path.join(golden_dir, 'config.json'))
  g = np.load(os.path.join(golden_dir, 'golden.npz'))
  weights = objective.loss_weights(cfg)
  n_euler = int(cfg.n_euler_steps)
  x = jnp.asarray(np.transpose(g['x'], (1, 0, 3, 4, 2)))  # (B, T, H, W, C)
  batch, nt = x.shape[:2]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(prefix, terms):
    for k in ('nll', 'kl_y_0', 'kl_z', 'l2_res', 'loss'):
      yield compare(f'{prefix}/loss/{k}', 'loss', terms[k], g[f'{prefix}/loss/{k}'])

  # --- Evaluation mode, all frames given. ---
  if 'eval' in parts and 'eval/x_rec' in g:
    w_frames, skip_frame = model.eval_noise_frames(nt, batch)
    noise = TrainNoise(eps_y0=jnp.asarray(g['eval/eps_y0']), eps_z=jnp.asarray(_tb(g['eval/eps_z'])),
                       w_frames=w_frames, skip_frame=skip_frame)

    @jax.jit
    def eval_pass(params, rest, x, noise):
      m = nnx.merge(graphdef, params, rest)
      out = m(x, noise, n_euler_steps=n_euler, train=False)
      hx, skips = m.encode(x, train=False)
      return out, hx, [s[:, -1] for s in skips], m.inf_z(hx), objective.loss_terms(x, out, **weights)

    out, hx, skips, hx_z, terms = eval_pass(params, rest, x, noise)
    yield compare('eval/hx', 'forward', _tb(hx), g['eval/hx'])
    if cfg.skipco:
      for i, s in enumerate(skips):
        yield compare(f'eval/skip{i}', 'forward', np.transpose(np.asarray(s), (0, 3, 1, 2)), g[f'eval/skip{i}'])
    yield compare('eval/w', 'forward', out.w, g['eval/w'])
    yield compare('eval/hx_z', 'forward', _tb(hx_z), g['eval/hx_z'])
    yield compare('eval/q_y_0_params', 'forward', out.q_y0, g['eval/q_y_0_params'])
    yield compare('eval/q_z_params', 'forward', _tb(out.q_z), g['eval/q_z_params'])
    yield compare('eval/p_z_params', 'forward', _tb(out.p_z), g['eval/p_z_params'])
    yield compare('eval/y', 'forward', _tb(out.y), g['eval/y'])
    yield compare('eval/z', 'forward', _tb(out.z), g['eval/z'])
    yield compare('eval/res', 'forward', _tb(out.res), g['eval/res'])
    yield compare('eval/x_rec', 'forward', _tbchw(out.x_rec), g['eval/x_rec'])
    yield from losses('eval', terms)

  # --- Test-time prediction protocol. ---
  if 'pred' in parts and 'pred/x_pred' in g:
    nt_cond = int(g['pred/nt_cond'])
    noise = PredNoise(eps_y0=jnp.asarray(g['pred/eps_y0'])[None],
                      eps_z_post=jnp.asarray(_tb(g['pred/eps_z_post']))[None],
                      eps_z_prior=jnp.asarray(_tb(g['pred/eps_z_prior']))[None])

    @jax.jit
    def pred_pass(params, rest, x_cond, noise):
      return nnx.merge(graphdef, params, rest).predict(x_cond, noise, n_euler_steps=n_euler, reconstruct_cond=True)

    pred = pred_pass(params, rest, x[:, :nt_cond], noise)
    yield compare('pred/x_cond_rec', 'forward', _tbchw(pred.x_cond_rec[0]), g['pred/x_cond_rec'])
    yield compare('pred/y', 'forward', _tb(pred.y[0]), g['pred/y'])
    yield compare('pred/x_pred', 'forward', _tbchw(pred.x_pred[0]), g['pred/x_pred'])

  # --- One training pass: loss, gradients, BatchNorm statistics after it. ---
  if 'train' in parts and 'train/x_rec' in g:
    noise = TrainNoise(eps_y0=jnp.asarray(g['train/eps_y0']), eps_z=jnp.asarray(_tb(g['train/eps_z'])),
                       w_frames=jnp.asarray(g['train/w_frames'].T, jnp.int32),
                       skip_frame=jnp.asarray(g['train/skip_frame'], jnp.int32))

    @jax.jit
    def train_pass(params, rest, x, noise):
      def loss_fn(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        out = m(x, noise, n_euler_steps=n_euler, train=True)
        terms = objective.loss_terms(x, out, **weights)
        return terms['loss'], (terms, out.x_rec, nnx.state(m, nnx.BatchStat))
      return jax.grad(loss_fn, has_aux=True)(params)

    grads, (terms, x_rec, stats) = train_pass(params, rest, x, noise)
    yield compare('train/x_rec', 'forward', _tbchw(x_rec), g['train/x_rec'])
    yield from losses('train', terms)
    grad_sd = convert.state_dict_from_model(nnx.merge(graphdef, grads, rest))
    for key in g.files:
      if key.startswith('train/grad/'):
        yield compare(key, 'grad', grad_sd[key[len('train/grad/'):]], g[key])
    after_sd = convert.state_dict_from_model(nnx.merge(graphdef, params, stats))
    for key in g.files:
      if key.startswith('train/bn_after/'):
        yield compare(key, 'forward', after_sd[key[len('train/bn_after/'):]], g[key])


def run(golden_dirs: list[str], printer: Callable[[str], None] = print) -> bool:
  """Replays every folder; prints one line per quantity; True when all are within tolerance."""
  all_ok = True
  for d in golden_dirs:
    printer(f'== {d}')
    n = n_bad = 0
    for c in replay(d):
      n += 1
      n_bad += not c.ok
      printer(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<55s} abs {c.abs_err:.3e}  rel {c.rel_err:.3e}"
              f'  (tol {TOLERANCES[c.kind]:.0e})')
    printer(f'{d}: {n - n_bad}/{n} quantities within tolerance')
    all_ok &= n_bad == 0 and n > 0
  return all_ok


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m srvp_jax.parity', description=__doc__.split('\n\n')[0])
  parser.add_argument('golden_dirs', nargs='+', metavar='GOLDEN_DIR')
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')  # The reference was computed in float32 on CPU.
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    return 0 if run(args.golden_dirs) else 1
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
