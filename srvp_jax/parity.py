"""Replays data recorded with the official PyTorch code and compares our model with it.

    python -m srvp_jax.parity GOLDEN_DIR [GOLDEN_DIR ...]

GOLDEN_DIR holds ``model.pt``, ``config.json`` and the recorded data laid out as
``shared/reference/README.md`` describes (any configuration):

- ``golden64.npz``, the primary reference: the official code run in float64. It is replayed with
  the whole model in float64 (parameters, BatchNorm statistics, computation; ``jax_enable_x64``)
  and every recorded quantity, gradients included, must agree to ``1e-10`` relative to the
  reference tensor's largest magnitude. In float64 no activation lies within rounding of a kink,
  so the check is exact and does not depend on the machine.
- ``golden.npz``, the official code in float32, replayed in float32: forward values and losses
  (``1e-5``), and the gradients of DCGAN cases (``1e-4``). Gradients of VGG cases are not compared
  in float32: a few LeakyReLU pre-activations lie within float32 rounding of the kink, so the
  recorded float32 gradients depend on the machine's kernels (the official code itself moves them
  by up to 2.3% from one machine to another).

Every recorded computation is replayed on CPU: evaluation mode, the test-time prediction protocol,
and one training pass with gradients and the BatchNorm statistics after it. One line is printed per
quantity with its max absolute and relative error; the exit status is 1 when any quantity exceeds
its tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srvp_jax import cli
from srvp_jax import config as config_lib
from srvp_jax import convert, objective
from srvp_jax.model import PredNoise, TrainNoise, backend

# Tolerances relative to each reference tensor's largest magnitude, per precision and kind of quantity.
TOLERANCES = {
    'float64': {'forward': 1e-10, 'loss': 1e-10, 'grad': 1e-10},
    'float32': {'forward': 1e-5, 'loss': 1e-5, 'grad': 1e-4},
}
REFERENCE_FILES = {'float64': 'golden64.npz', 'float32': 'golden.npz'}
PARTS = ('eval', 'pred', 'train')


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Our value of one recorded quantity against the reference."""
  name: str  # The reference key, e.g. 'train/grad/encoder.conv.0.0.weight'.
  kind: str  # 'forward', 'loss' or 'grad'.
  precision: str  # 'float64' (golden64.npz) or 'float32' (golden.npz).
  abs_err: float
  rel_err: float  # abs_err / max |reference|.

  @property
  def tolerance(self) -> float:
    return TOLERANCES[self.precision][self.kind]

  @property
  def ok(self) -> bool:
    return self.rel_err <= self.tolerance

  def line(self) -> str:
    return (f"{'ok' if self.ok else 'FAIL':<4s} {self.precision} {self.name:<55s} abs {self.abs_err:.3e}  "
            f'rel {self.rel_err:.3e}  (tol {self.tolerance:.0e})')


def compare(name: str, kind: str, precision: str, ours, ref) -> Comparison:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{name}: shape {ours.shape} differs from the reference {ref.shape}')
  abs_err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return Comparison(name, kind, precision, abs_err, abs_err / max(scale, 1e-300))


def _tbchw(a):
  """Our (B, T, H, W, C) -> official (T, B, C, H, W)."""
  return np.transpose(np.asarray(a), (1, 0, 4, 2, 3))


def _tb(a):
  """Our (B, T, ...) -> official (T, B, ...)."""
  return np.swapaxes(np.asarray(a), 0, 1)


def precisions(golden_dir: str) -> list[str]:
  """The precisions recorded in ``golden_dir`` (float64 first); an error when it lacks a piece."""
  for f in ('model.pt', 'config.json'):
    if not os.path.isfile(os.path.join(golden_dir, f)):
      raise FileNotFoundError(f'{golden_dir} lacks {f}: expected model.pt, config.json and golden64.npz '
                              '(and/or golden.npz)')
  found = [p for p, f in REFERENCE_FILES.items() if os.path.isfile(os.path.join(golden_dir, f))]
  if not found:
    raise FileNotFoundError(f'{golden_dir} lacks golden64.npz and golden.npz: no recorded data to replay')
  return found


def replay(golden_dir: str, precision: str = 'float64', parts: tuple[str, ...] = PARTS,
           forms: str | None = None) -> list[Comparison]:
  """One comparison per recorded quantity of ``golden_dir`` in ``precision`` (of the recorded ``parts``).

  ``forms``: the platform whose layer formulations and scan unrolling are traced ('cpu', 'gpu';
  ``model.backend.compile_for``), executed here on CPU; None: this process's backend.
  """
  if precision not in REFERENCE_FILES:
    raise ValueError(f'precision={precision!r}: expected one of {sorted(REFERENCE_FILES)}')
  path = os.path.join(golden_dir, REFERENCE_FILES[precision])
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{golden_dir} lacks {REFERENCE_FILES[precision]}')
  forms_context = backend.compile_for(forms) if forms else contextlib.nullcontext()
  with jax.enable_x64(precision == 'float64'), jax.default_matmul_precision('highest'), forms_context, \
      np.load(path) as g:
    return list(_replay(golden_dir, precision, dict(g), parts))


def _replay(golden_dir: str, precision: str, g: dict, parts: tuple[str, ...]) -> Iterator[Comparison]:
  cfg = config_lib.load_official_json(os.path.join(golden_dir, 'config.json'))
  cfg.param_dtype = precision
  model = convert.model_from_state_dict(convert.load_torch_file(os.path.join(golden_dir, 'model.pt')), cfg)
  dtype = jnp.float64 if precision == 'float64' else jnp.float32
  arr = lambda a: jnp.asarray(a, dtype)
  x = arr(np.transpose(g['x'], (1, 0, 3, 4, 2)))
  weights = objective.loss_weights(cfg)
  n_euler = int(cfg.n_euler_steps)
  batch, nt = x.shape[:2]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cmp = lambda name, kind, ours: compare(name, kind, precision, ours, g[name])
  # Float32 gradients of VGG cases are no reference (module docstring).
  compare_grads = precision == 'float64' or cfg.archi == 'dcgan'

  def losses(prefix, terms):
    for k in ('nll', 'kl_y_0', 'kl_z', 'l2_res', 'loss'):
      yield cmp(f'{prefix}/loss/{k}', 'loss', terms[k])

  # --- Evaluation mode, all frames given. ---
  if 'eval' in parts and 'eval/x_rec' in g:
    w_frames, skip_frame = model.eval_noise_frames(nt, batch)
    noise = TrainNoise(eps_y0=arr(g['eval/eps_y0']), eps_z=arr(_tb(g['eval/eps_z'])), w_frames=w_frames,
                       skip_frame=skip_frame)

    @jax.jit
    def eval_pass(params, rest, x, noise):
      m = nnx.merge(graphdef, params, rest)
      out = m(x, noise, n_euler_steps=n_euler, train=False)
      hx, skips = m.encode(x, train=False)
      return out, hx, [s[:, -1] for s in skips], m.inf_z(hx), objective.loss_terms(x, out, **weights)

    out, hx, skips, hx_z, terms = eval_pass(params, rest, x, noise)
    yield cmp('eval/hx', 'forward', _tb(hx))
    if cfg.skipco:
      for i, s in enumerate(skips):
        yield cmp(f'eval/skip{i}', 'forward', np.transpose(np.asarray(s), (0, 3, 1, 2)))
    yield cmp('eval/w', 'forward', out.w)
    yield cmp('eval/hx_z', 'forward', _tb(hx_z))
    yield cmp('eval/q_y_0_params', 'forward', out.q_y0)
    yield cmp('eval/q_z_params', 'forward', _tb(out.q_z))
    yield cmp('eval/p_z_params', 'forward', _tb(out.p_z))
    yield cmp('eval/y', 'forward', _tb(out.y))
    yield cmp('eval/z', 'forward', _tb(out.z))
    yield cmp('eval/res', 'forward', _tb(out.res))
    yield cmp('eval/x_rec', 'forward', _tbchw(out.x_rec))
    yield from losses('eval', terms)

  # --- Test-time prediction protocol. ---
  if 'pred' in parts and 'pred/x_pred' in g:
    nt_cond = int(g['pred/nt_cond'])
    noise = PredNoise(eps_y0=arr(g['pred/eps_y0'])[None], eps_z_post=arr(_tb(g['pred/eps_z_post']))[None],
                      eps_z_prior=arr(_tb(g['pred/eps_z_prior']))[None])

    @jax.jit
    def pred_pass(params, rest, x_cond, noise):
      return nnx.merge(graphdef, params, rest).predict(x_cond, noise, n_euler_steps=n_euler, reconstruct_cond=True)

    pred = pred_pass(params, rest, x[:, :nt_cond], noise)
    yield cmp('pred/x_cond_rec', 'forward', _tbchw(pred.x_cond_rec[0]))
    yield cmp('pred/y', 'forward', _tb(pred.y[0]))
    yield cmp('pred/x_pred', 'forward', _tbchw(pred.x_pred[0]))

  # --- One training pass: loss, gradients, BatchNorm statistics after it. ---
  if 'train' in parts and 'train/x_rec' in g:
    noise = TrainNoise(eps_y0=arr(g['train/eps_y0']), eps_z=arr(_tb(g['train/eps_z'])),
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
    yield cmp('train/x_rec', 'forward', _tbchw(x_rec))
    yield from losses('train', terms)
    if compare_grads:
      grad_sd = convert.state_dict_from_model(nnx.merge(graphdef, grads, rest))
      for key in g:
        if key.startswith('train/grad/'):
          yield cmp(key, 'grad', grad_sd[key[len('train/grad/'):]])
    after_sd = convert.state_dict_from_model(nnx.merge(graphdef, params, stats))
    for key in g:
      if key.startswith('train/bn_after/'):
        yield cmp(key, 'forward', after_sd[key[len('train/bn_after/'):]])


def run(golden_dirs: list[str], printer: Callable[[str], None] = print) -> bool:
  """Replays every folder in each recorded precision, then float64 again with the GPU layer forms and scan
  unrolling (traced for a GPU, run on CPU: both forms are exact); one line per quantity; True when all pass."""
  all_ok = True
  for d in golden_dirs:
    runs = [(precision, None) for precision in precisions(d)]
    runs += [('float64', 'gpu')] if 'float64' in precisions(d) else []
    for precision, forms in runs:
      tag = f'{precision}, GPU layer forms and scan unrolling' if forms else precision
      printer(f'== {d} ({REFERENCE_FILES[precision]}, {tag})')
      results = replay(d, precision, forms=forms)
      for c in results:
        printer(c.line())
      n_ok = sum(c.ok for c in results)
      skipped = ('; float32 gradients of a VGG case are not compared (not a reference)'
                 if precision == 'float32' and not any(c.kind == 'grad' for c in results) else '')
      printer(f'{d} [{tag}]: {n_ok}/{len(results)} quantities within tolerance{skipped}')
      all_ok &= n_ok == len(results) and bool(results)
  return all_ok


def main(argv: Sequence[str] | None = None) -> int:
  """Replays the folders; returns the exit status (2: a folder lacks a piece, 1: a quantity out of tolerance)."""
  return cli.main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  parser = cli.Parser(prog='python -m srvp_jax.parity', description=__doc__.split('\n\n')[0],
                      examples='example:\n  python -m srvp_jax.parity ../shared/reference/golden/*')
  parser.add_argument('golden_dirs', nargs='+', metavar='GOLDEN_DIR')
  args = parser.parse_args(argv)
  cli.start(args.verbose)
  jax.config.update('jax_platforms', 'cpu')  # The references were computed on CPU.
  try:
    return 0 if run(args.golden_dirs) else 1
  except (FileNotFoundError, ValueError) as e:
    raise cli.UsageError(str(e)) from None


if __name__ == '__main__':
  sys.exit(main())
