"""Replays data recorded with the official PyTorch code and compares our model with it.

    python -m srvp_jax.parity GOLDEN_DIR [GOLDEN_DIR ...]

GOLDEN_DIR holds ``model.pt``, ``config.json`` and ``golden.npz`` laid out as
``shared/reference/README.md`` describes (any configuration). Every recorded computation is
replayed on CPU in float32: evaluation mode, the test-time prediction protocol, and one training
pass with gradients and the BatchNorm statistics after it. One line is printed per quantity with
its max absolute and relative error (relative to the reference's largest magnitude); the exit
status is non-zero when any quantity exceeds its tolerance.

Near-kink derivative branches (disabled by ``--strict``). LeakyReLU is not differentiable at 0; a
pre-activation within float32 rounding error of 0 may land on the other side of the kink in PyTorch
than in our (equally valid) float32 computation, so the two codes legitimately use different
derivative branches there, and training-mode BatchNorm spreads that one-pixel difference over every
upstream gradient. When every non-gradient quantity matches but some gradients do not, the checker
lists, in the training pass, the LeakyReLU pre-activations h with |h| <= KINK_ULPS * eps_f32 * max|h|
of their layer (float32 rounding of a convolution + BatchNorm output is a few tens of ulps of the
layer's magnitude; KINK_ULPS = 64), and searches (greedily, capped: the MAX_CANDIDATES candidates
closest to the kink relative to their threshold, at most MAX_FLIPS flips) for a set of them whose
derivative branch, flipped (forward values unchanged), brings every gradient within tolerance. If one does, the gradient lines are marked ``ok*``, each flipped
activation is printed, and the folder passes; otherwise it fails as in strict mode. ReLU (MLPs) and
max-pooling ties are not searched.
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
# Near-kink search (see the module docstring).
EPS_F32 = float(np.finfo(np.float32).eps)
KINK_ULPS = 64  # A pre-activation h is near the kink when |h| <= KINK_ULPS * EPS_F32 * max|h| of its layer.
KINK_TOP_K = 32  # Smallest |h| examined per layer.
MAX_CANDIDATES = 16  # Near-kink candidates searched (closest to the kink first, relative to the threshold).
MAX_FLIPS = 4  # Flipped branches at most (greedy forward selection).


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


def _load(golden_dir: str):
  """(model, config, golden arrays, input video (B, T, H, W, C)) of ``golden_dir``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from srvp_jax import convert  # pylint: disable=import-outside-toplevel

  for f in ('model.pt', 'config.json', 'golden.npz'):
    if not os.path.isfile(os.path.join(golden_dir, f)):
      raise FileNotFoundError(f'{golden_dir} lacks {f}: expected model.pt, config.json and golden.npz')
  model, cfg = convert.load_official(os.path.join(golden_dir, 'model.pt'), os.path.join(golden_dir, 'config.json'))
  g = np.load(os.path.join(golden_dir, 'golden.npz'))
  return model, cfg, g, jnp.asarray(np.transpose(g['x'], (1, 0, 3, 4, 2)))


def _train_noise(g):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from srvp_jax.model import TrainNoise  # pylint: disable=import-outside-toplevel
  return TrainNoise(eps_y0=jnp.asarray(g['train/eps_y0']), eps_z=jnp.asarray(_tb(g['train/eps_z'])),
                    w_frames=jnp.asarray(g['train/w_frames'].T, jnp.int32),
                    skip_frame=jnp.asarray(g['train/skip_frame'], jnp.int32))


def _grad_comparisons(g, grad_sd) -> list[Comparison]:
  return [compare(k, 'grad', grad_sd[k[len('train/grad/'):]], g[k]) for k in g.files if k.startswith('train/grad/')]


def replay(golden_dir: str, parts: tuple[str, ...] = PARTS) -> Iterator[Comparison]:
  """Yields one comparison per recorded quantity of ``golden_dir`` (of the recorded ``parts``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from srvp_jax import convert, objective  # pylint: disable=import-outside-toplevel
  from srvp_jax.model import PredNoise, TrainNoise  # pylint: disable=import-outside-toplevel

  model, cfg, g, x = _load(golden_dir)
  weights = objective.loss_weights(cfg)
  n_euler = int(cfg.n_euler_steps)
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
    noise = _train_noise(g)

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
    yield from _grad_comparisons(g, grad_sd)
    after_sd = convert.state_dict_from_model(nnx.merge(graphdef, params, stats))
    for key in g.files:
      if key.startswith('train/bn_after/'):
        yield compare(key, 'forward', after_sd[key[len('train/bn_after/'):]], g[key])


@dataclasses.dataclass
class KinkFlip:
  """A LeakyReLU pre-activation of the training pass within float32 rounding of the kink."""
  layer: str  # Official name of the block (conv, BatchNorm, LeakyReLU), e.g. 'decoder.conv.3.0'.
  index: tuple[int, ...]  # (frame n, row, col, channel) in our (N, H, W, C) layout; n = b * T + t.
  value: float  # The pre-activation (our float32 value).
  threshold: float  # KINK_ULPS * EPS_F32 * max|h| of the layer.

  def describe(self) -> str:
    n, h, w, c = self.index
    return (f'{self.layer} at (n={n}, h={h}, w={w}, c={c}): pre-activation {self.value:+.3e}, '
            f'threshold {self.threshold:.3e}')


@dataclasses.dataclass
class KinkSearch:
  candidates: list[KinkFlip]  # Near-kink pre-activations searched (at most MAX_CANDIDATES).
  n_candidates_found: str  # Before the cap ('>=N' when a layer had more than KINK_TOP_K).
  flips: list[KinkFlip] | None  # The flip set that explains every gradient, None if none was found.
  grads: list[Comparison]  # Gradient comparisons with ``flips`` (or with the best set tried).
  n_tried: int  # Flip sets evaluated.

  def summary(self) -> str:
    return (f'kink search: {self.n_candidates_found} near-kink candidates (searched {len(self.candidates)}, '
            f'cap {MAX_CANDIDATES}), {self.n_tried} flip sets tried (greedy, at most {MAX_FLIPS} flips)')


def _leaky_blocks(model) -> dict[int, str]:
  """id of every LeakyReLU ConvBlock of ``model`` -> its official name (e.g. 'encoder.conv.2.2')."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from srvp_jax.model import layers  # pylint: disable=import-outside-toplevel
  names = {id(t.variable): t.name for t in model.torch_tensors()}
  out = {}
  for _, m in nnx.iter_modules(model):
    if isinstance(m, layers.ConvBlock) and m.activation == 'leaky_relu':
      name = names[id(next(m.conv.torch_tensors('')).variable)]
      assert name.endswith('.0.weight'), name
      out[id(m)] = name[:-len('.0.weight')]
  return out


def search_kinks(golden_dir: str) -> KinkSearch:
  """Looks for near-kink LeakyReLU derivative branches that explain the gradient mismatch (module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from srvp_jax import convert, objective  # pylint: disable=import-outside-toplevel
  from srvp_jax.model import layers  # pylint: disable=import-outside-toplevel

  model, cfg, g, x = _load(golden_dir)
  weights = objective.loss_weights(cfg)
  n_euler = int(cfg.n_euler_steps)
  noise = _train_noise(g)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  layer_names = sorted(_leaky_blocks(model).values())
  shapes = {}
  no_flip = np.iinfo(np.int32).max  # Out of range: dropped by the scatter below.

  @jax.jit
  def flipped_train_pass(params, rest, x, noise, flips):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      blocks, record = _leaky_blocks(m), {}

      def hook(block, h):
        name = blocks.get(id(block))
        if name is None:
          return layers.ACTIVATIONS[block.activation](h)
        if name in record:
          raise ValueError(f'{name} is applied more than once in the training pass')
        shapes[name] = h.shape
        flat = h.reshape(-1)
        _, idx = jax.lax.top_k(-jnp.abs(flat), KINK_TOP_K)
        record[name] = (jnp.max(jnp.abs(flat)), idx, flat[idx])
        flip = jnp.zeros(flat.shape, bool).at[flips[name]].set(True, mode='drop').reshape(h.shape)
        return layers.leaky_relu_branch(h, flip)

      with layers.activation_hook(hook):
        out = m(x, noise, n_euler_steps=n_euler, train=True)
      return objective.loss_terms(x, out, **weights)['loss'], record
    return jax.grad(loss_fn, has_aux=True)(params)

  def flip_arrays(flip_set):
    flips = {name: np.full((MAX_FLIPS,), no_flip, np.int32) for name in layer_names}
    for k, f in enumerate(flip_set):
      flips[f.layer][k] = np.ravel_multi_index(f.index, shapes[f.layer])
    return flips

  def evaluate(flip_set):
    grads, record = flipped_train_pass(params, rest, x, noise, flip_arrays(flip_set))
    return _grad_comparisons(g, convert.state_dict_from_model(nnx.merge(graphdef, grads, rest))), record

  def excess(comps):  # Total log-excess over the tolerances, then the worst ratio: 0 when all pass.
    ratios = [c.rel_err / TOLERANCES[c.kind] for c in comps]
    return sum(np.log(max(r, 1.0)) for r in ratios), max(ratios)

  jax.eval_shape(lambda: flipped_train_pass(params, rest, x, noise, flip_arrays([])))  # Records the shapes.
  base, record = evaluate([])
  found, saturated = [], False
  for name in layer_names:
    max_abs, idx, vals = (np.asarray(a) for a in record[name])
    threshold = KINK_ULPS * EPS_F32 * float(max_abs)
    saturated |= abs(float(vals[-1])) <= threshold  # More than KINK_TOP_K in this layer: count is a lower bound.
    for i, v in zip(idx, vals):
      if abs(float(v)) <= threshold:
        found.append(KinkFlip(name, tuple(int(j) for j in np.unravel_index(int(i), shapes[name])), float(v), threshold))
  # The closer to the kink (relative to the layer's rounding scale), the likelier PyTorch's float32 value
  # has the other sign: those candidates come first.
  candidates = sorted(found, key=lambda f: abs(f.value) / f.threshold)[:MAX_CANDIDATES]

  n_found = f"{'>=' if saturated else ''}{len(found)}"
  current, current_grads, current_score, n_tried = [], base, excess(base), 1
  if all(c.ok for c in base):
    return KinkSearch(candidates, n_found, [], base, n_tried)
  while len(current) < MAX_FLIPS:
    best = None
    for cand in candidates:
      if cand in current:
        continue
      comps, _ = evaluate(current + [cand])
      n_tried += 1
      if all(c.ok for c in comps):
        return KinkSearch(candidates, n_found, current + [cand], comps, n_tried)
      if best is None or excess(comps) < best[0]:
        best = (excess(comps), cand, comps)
    if best is None or best[0] >= current_score:
      break
    current_score, current_grads = best[0], best[2]
    current.append(best[1])
  return KinkSearch(candidates, n_found, None, current_grads, n_tried)


def _line(marker: str, c: Comparison, extra: str = '') -> str:
  return (f'{marker:<4s} {c.name:<55s} abs {c.abs_err:.3e}  rel {c.rel_err:.3e}  (tol {TOLERANCES[c.kind]:.0e})'
          f'{extra}')


def run(golden_dirs: list[str], printer: Callable[[str], None] = print, strict: bool = False) -> bool:
  """Replays every folder; prints one line per quantity; True when all are within tolerance.

  Unless ``strict``, a gradient mismatch (with every other quantity within tolerance) is explained
  by flipping near-kink LeakyReLU derivative branches when possible (``search_kinks``); such gradient
  lines are marked ``ok*`` and the flipped activations are printed.
  """
  all_ok = True
  for d in golden_dirs:
    printer(f'== {d}')
    results = []
    for c in replay(d):
      results.append(c)
      if c.kind != 'grad':
        printer(_line('ok' if c.ok else 'FAIL', c))
    grads = [c for c in results if c.kind == 'grad']
    n, n_bad = len(results), sum(not c.ok for c in results)
    search = None
    if not strict and any(not c.ok for c in grads) and all(c.ok for c in results if c.kind != 'grad'):
      search = search_kinks(d)
    if search is not None and search.flips:
      flipped = {c.name: c for c in search.grads}
      for c in grads:
        f = flipped[c.name]
        printer(_line('ok' if c.ok else 'ok*', f, '' if c.ok else f'  strict rel {c.rel_err:.3e}'))
      printer(f'* {sum(not c.ok for c in grads)} gradients pass only with these {len(search.flips)} LeakyReLU '
              'derivative branches flipped (forward values unchanged; pre-activation within float32 rounding of '
              f'the kink, |h| <= {KINK_ULPS} * eps_f32 * max|h| of the layer):')
      for f in search.flips:
        printer(f'flip {f.describe()}')
      printer(f'{search.summary()}; --strict disables it')
      n_bad = 0
    else:
      for c in grads:
        printer(_line('ok' if c.ok else 'FAIL', c))
      if search is not None:
        printer(f'{search.summary()}: no flip set brings every gradient within tolerance')
        for f in search.candidates:
          printer(f'candidate {f.describe()}')
    printer(f'{d}: {n - n_bad}/{n} quantities within tolerance')
    all_ok &= n_bad == 0 and n > 0
  return all_ok


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m srvp_jax.parity', description=__doc__.split('\n\n')[0])
  parser.add_argument('golden_dirs', nargs='+', metavar='GOLDEN_DIR')
  parser.add_argument('--strict', action='store_true',
                      help='no near-kink derivative-branch search: every gradient must match as computed')
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')  # The reference was computed in float32 on CPU.
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    return 0 if run(args.golden_dirs, strict=args.strict) else 1
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
