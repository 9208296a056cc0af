"""Training: lr schedule, data parallelism, resume, fail-fast, configs and a short learning run."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from srvp_jax import config as config_lib
from srvp_jax import sharding
from srvp_jax import train
from srvp_jax.train import runtime, validation
from srvp_jax.train import loop as train_loop
from srvp_jax.train import step as train_step
from srvp_jax.model import build_model

from helpers import on_four_devices, snapshot  # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(nf=8, nhx=16, nlayers_inf=2, nlayers_res=2, ny=4, nz=4, nh_inf=16, nh_res=16, nt_inf=2, nt_cond=2,
            seq_len=6, batch_size=8, lr_scheduling_burnin=4, lr_scheduling_n_iter=2, val_interval=1000,
            chkpt_interval=2, log_interval=1, n_samples_test=2, n_iter_test=1, batch_size_test=2, val_sample_chunk=2)


def tiny_config(**overrides):
  cfg = config_lib.default_config()
  cfg.update({**TINY, **overrides})
  return cfg


def step_indexed(seed=0, batch=8, t=6):
  """A fake step-indexed stream: batch k is a function of k only (like the real pipelines)."""
  def factory(start):
    def gen():
      k = start
      while True:
        yield np.random.default_rng([seed, k]).uniform(size=(batch, t, 64, 64, 1)).astype(np.float32)
        k += 1
    return gen()
  return factory


def test_lr_schedule_matches_official_lambda_lr():
  """Our schedule equals the official LambdaLR loop (scheduler stepped after updates >= burnin)."""
  torch = pytest.importorskip('torch')
  burnin, n_iter, lr = 5, 4, 3e-4
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda i: max(0, (n_iter - i) / n_iter))
  official = []
  for itr in range(1, burnin + n_iter + 1):
    official.append(opt.param_groups[0]['lr'])  # lr used by update number itr.
    if itr >= burnin:
      sched.step()
  ours = [float(train_step.lr_schedule(lr, burnin, n_iter)(c)) for c in range(burnin + n_iter)]
  np.testing.assert_allclose(ours, official, rtol=1e-6, atol=1e-12)
  assert ours[burnin - 1] == pytest.approx(lr) and ours[burnin] == pytest.approx(lr * (n_iter - 1) / n_iter)
  assert ours[-1] == 0.0
  # Without burn-in the decay starts with the first update (lr (n_iter - 1) / n_iter), as LambdaLR stepped at once.
  no_burnin = [float(train_step.lr_schedule(lr, 0, 3)(c)) for c in range(4)]
  np.testing.assert_allclose(no_burnin, [lr * 2 / 3, lr / 3, 0.0, 0.0], rtol=1e-6)


def test_val_resample_draws_other_videos_and_noise_at_each_validation():
  """Default: every validation sees the same videos (data seed) and noise; val_resample: its own, per step."""
  fixed, official = tiny_config(), tiny_config(val_resample=True)
  assert validation.validation_seed(fixed, 10) == validation.validation_seed(fixed, 20) == int(fixed.seed)
  same = [jax.random.key_data(validation.noise_key(fixed, s)) for s in (10, 20)]
  np.testing.assert_array_equal(*same)
  seeds = {validation.validation_seed(official, s) for s in (10, 20, 30)}
  assert len(seeds) == 3 and seeds == {validation.validation_seed(official, s) for s in (10, 20, 30)}
  other = [jax.random.key_data(validation.noise_key(official, s)) for s in (10, 20)]
  assert not np.array_equal(*other)
  with pytest.raises(config_lib.ConfigError, match='val_resample=1'):
    config_lib.validate(dict(tiny_config(), val_resample=1))


def dp_one_step():
  """One SGD step of TINY on all the devices of this process (the batch sharded over them): the loss, the device
  count, the parameter updates and the BatchNorm running statistics."""
  cfg = tiny_config()
  tx = optax.sgd(0.1)
  graphdef, state = train_step.init_state(build_model(cfg, 0), tx)
  init = jax.tree.leaves(jax.device_get(state.params))
  mesh = sharding.make_mesh(cfg)
  step = train_step.jit_train_step(train_step.make_train_step(graphdef, cfg, tx), mesh)
  state = sharding.replicate(state, mesh)
  x = np.random.default_rng(0).uniform(size=(8, 6, 64, 64, 1)).astype(np.float32)
  state, m = step(state, sharding.shard_local_batch(x, mesh), jax.random.key(1))
  updates = [np.asarray(a) - b for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), init)]
  stats = [np.asarray(a) for a in jax.tree.leaves(jax.device_get(state.batch_stats))
           if np.asarray(a).dtype == np.float32]
  return dict(loss=np.asarray(m['loss']), n_dev=jax.device_count(), **{f'update_{i}': a for i, a in enumerate(updates)},
              **{f'stat_{i}': a for i, a in enumerate(stats)})


def test_one_step_on_1_device_equals_4_devices(tmp_path):
  """Same global batch, same noise: loss, SGD updates and BatchNorm running statistics agree.

  Updates are compared to the largest update: gradient sums are reduced in another order across
  devices, and with training-mode BatchNorm many gradient entries are near-zero sums of large
  terms: in float32 a different reduction order moves them by ~1e-3 of the largest update (the
  same conditioning the official PyTorch code shows, see tests/test_parity.py). One device: this process.
  """
  out = {1: dp_one_step(), 4: on_four_devices('test_train', 'dp_one_step', tmp_path)}
  assert int(out[4]['n_dev']) == 4 and int(out[1]['n_dev']) == 1
  np.testing.assert_allclose(out[1]['loss'], out[4]['loss'], rtol=1e-6)
  updates = [k for k in out[1] if k.startswith('update_')]
  stats = [k for k in out[1] if k.startswith('stat_')]
  assert len(updates) > 20 and len(stats) > 10
  scale = max(np.abs(out[1][k]).max() for k in updates)
  for k in updates:
    np.testing.assert_allclose(out[1][k], out[4][k], rtol=0, atol=2e-3 * scale, err_msg=k)
  for k in stats:
    np.testing.assert_allclose(out[1][k], out[4][k], rtol=1e-5, atol=1e-6, err_msg=k)


def _params(workdir):
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  model, _, step = checkpoints.load_model(workdir, 'latest')
  return step, jax.tree.leaves(checkpoints.model_tree(model))


class _KillAt:
  """A stream that raises KeyboardInterrupt (like Ctrl-C) when asked for the batch of ``step``."""

  def __init__(self, factory, step):
    self.factory, self.step = factory, step

  def __call__(self, start):
    inner = self.factory(start)

    def gen():
      k = start
      while True:
        if k == self.step:
          raise KeyboardInterrupt
        yield next(inner)
        k += 1
    return gen()


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
  cfg = tiny_config(chkpt_interval=100)  # Only the interrupt (and the end) write checkpoints.
  no_val = lambda step: iter(())
  train.train_and_evaluate(cfg, str(tmp_path / 'full'), train_batches=step_indexed(), val_batches=no_val,
                           progress=False)
  killed = str(tmp_path / 'killed')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg, killed, train_batches=_KillAt(step_indexed(), 3), val_batches=no_val,
                             progress=False)
  assert _params(killed)[0] == 3
  train.train_and_evaluate(cfg, killed, train_batches=step_indexed(), val_batches=no_val, progress=False)
  (s1, full), (s2, resumed) = _params(str(tmp_path / 'full')), _params(killed)
  assert s1 == s2 == 6
  for a, b in zip(full, resumed):
    np.testing.assert_array_equal(a, b)
  # The logged learning rate is the one each update used (the optimizer's, at its own count).
  with open(tmp_path / 'full' / 'metrics.jsonl', encoding='utf-8') as f:
    lrs = {r['step']: r['lr'] for r in map(json.loads, f) if 'lr' in r}
  schedule = train_step.make_lr(cfg)
  assert lrs == pytest.approx({s: float(schedule(s - 1)) for s in range(1, 7)}, rel=1e-6)
  assert lrs[6] == 0.0


def test_non_finite_loss_stops_with_step_and_keeps_good_checkpoint(tmp_path):
  cfg = tiny_config()
  good = step_indexed()

  def poisoned(start):
    inner = good(start)

    def gen():
      k = start
      while True:
        x = next(inner)
        if k == 3:  # The batch of training step 4.
          x = x.copy()
          x[0, 0, 0, 0, 0] = np.nan
        yield x
        k += 1
    return gen()

  with pytest.raises(train.NonFiniteError, match='step 4'):
    train.train_and_evaluate(cfg, str(tmp_path), train_batches=poisoned, val_batches=lambda step: iter(()),
                             progress=False)
  step, leaves = _params(str(tmp_path))
  assert step == 2 and all(np.isfinite(a).all() for a in leaves)

  def poisoned_first(start):  # Step 1 is bad: there is no good checkpoint to speak of.
    inner = good(start)
    while True:
      yield np.full_like(next(inner), np.nan)
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(cfg, str(tmp_path / 'first'), train_batches=poisoned_first,
                             val_batches=lambda step: iter(()), progress=False)
  assert 'step 1' in str(e.value) and 'no checkpoint had been written yet' in str(e.value)
  assert 'last good checkpoint' not in str(e.value)


@pytest.mark.parametrize('name,params', [('smmnist', 10_678_284), ('mmnist_deterministic', 10_678_284),
                                         ('kth', 23_877_854), ('human', 23_880_158), ('bair', 23_847_390)])
def test_paper_configs_build_the_paper_models(name, params):
  import importlib.util  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from srvp_jax.model import build_model, param_count  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  config_lib.validate(cfg)  # launch.py validates once, after the command line's overrides.
  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  assert param_count(model) == params
  with pytest.raises(AttributeError):
    cfg.not_a_key = 1  # Locked.


def test_short_training_run_lowers_the_loss(tmp_path):
  """The quick-start setup on the offline digits learns: late losses are well below early ones."""
  cfg = tiny_config(digits_source='standin', nf=16, nhx=32, ny=8, nz=8, nh_inf=32, nh_res=32, seq_len=8,
                    nt_cond=3, batch_size=16, lr=1e-3, lr_scheduling_burnin=45, lr_scheduling_n_iter=1,
                    chkpt_interval=1000, log_interval=1, num_data_workers=2)
  from srvp_jax import data  # pylint: disable=import-outside-toplevel
  batches = lambda start: data.get_dataset(cfg).train_batches(16, seed=0, start_step=start)
  train.train_and_evaluate(cfg, str(tmp_path), train_batches=batches, val_batches=lambda step: iter(()),
                           progress=False)
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    losses = np.array([r['loss'] for r in map(json.loads, f) if 'loss' in r])
  assert len(losses) == 46 and np.isfinite(losses).all()  # Measured: late / early = 0.33 (0.24 after 61 steps).
  # The Gaussian NLL holds a constant (log obs_scale + log(2 pi) / 2 per pixel) no model can remove.
  floor = cfg.seq_len * 64 * 64 * (np.log(cfg.obs_scale) + 0.5 * np.log(2 * np.pi))
  early, late = np.mean(losses[:5]) - floor, np.mean(losses[-10:]) - floor
  assert late < 0.5 * early, (early, late)


def _save_steps(workdir, steps, psnr, keep=2, keep_period=0):
  """Saves tiny checkpoints at ``steps`` with validation PSNR ``psnr[step]`` (None: not validated)."""
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  folder = checkpoints.RunFolder(workdir, keep, keep_period=keep_period)
  folder.create()
  for step in steps:
    value = psnr.get(step)
    folder.save(step, {'w': np.full((2,), step, np.float32)}, {'step': step},
                metrics=None if value is None else {checkpoints.METRIC: value})
  folder.wait_until_finished()
  return folder


def test_one_manager_keeps_latest_periodic_and_best(tmp_path):
  """keep_checkpoints newest, every multiple of keep_period, and the best finite validation PSNR."""
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  psnr = {3: 20.0, 6: 25.0, 9: float('nan'), 12: 22.0}  # Step 9's validation is non-finite: never the best.
  folder = _save_steps(str(tmp_path), range(1, 14), psnr, keep=2, keep_period=4)
  assert folder.steps() == [4, 6, 8, 12, 13]  # 12, 13 newest; 4, 8, 12 periodic; 6 best.
  assert folder.best_step() == 6 and folder.best_metric() == 25.0
  reader = checkpoints.RunFolder(str(tmp_path))
  assert reader.resolve('best') == (checkpoints.CHECKPOINT_DIR, 6)
  assert reader.resolve('latest') == (checkpoints.CHECKPOINT_DIR, 13)
  assert reader.resolve('8') == (checkpoints.CHECKPOINT_DIR, 8)
  with pytest.raises(checkpoints.CheckpointNotFoundError, match=r'available: \[4, 6, 8, 12, 13\]'):
    reader.resolve('9')
  # Only non-finite validations: no best, and 'best' says which checkpoints exist.
  nan_only = str(tmp_path / 'nan')
  _save_steps(nan_only, (2, 4), {2: float('nan')})
  with pytest.raises(checkpoints.CheckpointNotFoundError, match=r'no validated checkpoint.*\[2, 4\].*latest'):
    checkpoints.RunFolder(nan_only).resolve('best')


def _tiny_run(workdir, cfg, **kw):
  return train.train_and_evaluate(cfg, workdir, train_batches=kw.pop('batches', step_indexed()),
                                  val_batches=kw.pop('val', lambda step: iter(())), progress=False, **kw)


def test_truncated_or_corrupt_checkpoints(tmp_path, capsys):
  """A truncated latest checkpoint: evaluation says corrupt/truncated; training resumes from the newest
  intact one (saying which was skipped) and ends as the uninterrupted run. Flipped bytes or non-finite
  values: one line saying the checkpoint is corrupt."""
  import glob  # pylint: disable=import-outside-toplevel
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  _tiny_run(workdir, tiny_config())  # Checkpoints 2, 4, 6.
  _, final = _params(workdir)
  data = lambda step: max(glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'model', '*', 'd', '*')),
                          key=os.path.getsize)
  path = data(6)
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(checkpoints.CorruptCheckpointError, match='corrupt or truncated') as e:
    checkpoints.load_model(workdir, 'latest')
  assert 'does not match' not in str(e.value) and '\n' not in str(e.value)
  path = data(4)
  with open(path, 'rb') as f:
    raw = bytearray(f.read())
  for i in range(0, len(raw), 97):
    raw[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(raw))
  with pytest.raises(checkpoints.CorruptCheckpointError, match='corrupt'):
    checkpoints.load_model(workdir, '4')
  capsys.readouterr()
  _tiny_run(workdir, tiny_config())
  err = capsys.readouterr().err
  assert 'skipped step 6' in err and 'skipped step 4' in err and 'resuming at step 2' in err, err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'corrupt_6'))  # Kept aside, not deleted.
  step, resumed = _params(workdir)
  assert step == 6
  for a, b in zip(final, resumed):
    np.testing.assert_array_equal(a, b)
  # Non-finite values in an otherwise readable checkpoint.
  nan_dir = str(tmp_path / 'nan')
  cfg = config_lib.with_overrides(**TINY)
  nan_folder = checkpoints.RunFolder(nan_dir)
  nan_folder.save_config(cfg)
  model = build_model(cfg, jax.random.key(0))
  tree = jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.asarray(x).dtype)
                      if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x),
                      checkpoints.model_tree(model))
  nan_folder.create()
  nan_folder.save(1, tree, {'step': 1})
  nan_folder.wait_until_finished()
  with pytest.raises(checkpoints.CorruptCheckpointError, match='corrupt: non-finite values'):
    checkpoints.load_model(nan_dir, 'latest')


def test_config_contradicting_the_checkpoints_is_refused_before_writing(tmp_path):
  workdir = str(tmp_path / 'run')
  _tiny_run(workdir, tiny_config(lr_scheduling_burnin=2, lr_scheduling_n_iter=0))
  before = snapshot(workdir)
  with pytest.raises(config_lib.ConfigError, match=r'another model \(nf: 8 -> 16; nhx: 16 -> 32\)'):
    _tiny_run(workdir, tiny_config(nf=16, nhx=32))
  assert snapshot(workdir) == before


def test_validation_draws_exactly_n_samples_whatever_the_chunk():
  """Best-of-3 by PSNR is the same with chunks of 1, 2 (padded to 4: the padding never competes) or 3."""
  cfg = tiny_config(nc=1)
  model = build_model(cfg, jax.random.key(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(1), (3, int(cfg.seq_len), 64, 64, 1))
  key = jax.random.key(2)
  results = []
  for chunk in (1, 2, 3):
    batch_psnr = validation.make_batch_psnr(graphdef, tiny_config(nc=1, val_sample_chunk=chunk), 3)
    results.append(np.asarray(batch_psnr(params, stats, x, key)))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
  np.testing.assert_allclose(results[0], results[2], rtol=1e-6)


def test_periodic_actions_validate_at_the_official_times_only():
  """Validation at multiples of val_interval (not at a last step that is not one); a checkpoint at
  every validation, every chkpt_interval steps and at the end; logs every log_interval steps and at the end."""
  actions = train.PeriodicActions.from_config(tiny_config(lr_scheduling_burnin=20, lr_scheduling_n_iter=5,
                                                          val_interval=10, chkpt_interval=4, log_interval=3))
  steps = range(1, 26)
  assert [s for s in steps if actions.validation_due(s)] == [10, 20]
  assert [s for s in steps if actions.checkpoint_due(s)] == [4, 8, 10, 12, 16, 20, 24, 25]
  assert [s for s in steps if actions.log_due(s)] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
  default = train.PeriodicActions.from_config(tiny_config(val_interval=3, chkpt_interval=0))
  assert [s for s in range(1, 7) if default.checkpoint_due(s)] == [3, 6]  # Default: every validation (+ the end).
  with pytest.raises(config_lib.ConfigError, match='val_interval=0'):
    config_lib.validate(tiny_config(val_interval=0))
  with pytest.raises(config_lib.ConfigError, match='profile_steps=-1'):
    config_lib.validate(tiny_config(profile_steps=-1))


def test_earlier_layout_still_evaluates_and_fine_tunes_but_does_not_resume(tmp_path):
  """checkpoints/<step> + best/<step> (the earlier layout): load_model reads both; training refuses in one
  line that says how to go on (init_from), which then starts from its best model (model part only)."""
  from srvp_jax import checkpoints  # pylint: disable=import-outside-toplevel
  old = str(tmp_path / 'old')
  cfg = config_lib.with_overrides(**TINY)
  checkpoints.RunFolder(old).save_config(cfg)
  trees = {}
  for sub, step, seed in ((checkpoints.CHECKPOINT_DIR, 4, 1), (checkpoints.LEGACY_BEST_DIR, 2, 2)):
    trees[step] = checkpoints.model_tree(build_model(cfg, jax.random.key(seed)))
    writer = checkpoints.RunFolder(str(tmp_path / sub))  # Written as a run, then moved into place.
    writer.create()
    writer.save(step, trees[step], {'step': step}, opt_state=None)
    writer.close()
    os.rename(writer.directory, os.path.join(old, sub))
  for which, step in (('best', 2), ('latest', 4), ('4', 4)):
    model, _, got = checkpoints.load_model(old, which)
    assert got == step
    for a, b in zip(jax.tree.leaves(checkpoints.model_tree(model)), jax.tree.leaves(trees[step])):
      np.testing.assert_array_equal(a, b)
  before = snapshot(old)
  with pytest.raises(config_lib.ConfigError, match='earlier checkpoint layout.*init_from='):
    _tiny_run(old, tiny_config())
  assert snapshot(old) == before
  new = str(tmp_path / 'new')
  _tiny_run(new, tiny_config(init_from=old, lr_scheduling_burnin=1, lr_scheduling_n_iter=0), tx=optax.set_to_zero())
  model, _, _ = checkpoints.load_model(new, 'latest')
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  source = nnx.to_pure_dict(nnx.state(checkpoints.load_model(old, 'best')[0], nnx.Param))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_validation_is_reported_and_never_best(tmp_path, capsys):
  folder = _save_steps(str(tmp_path), [2], {2: float('nan')})
  console = runtime.Console(10, 2, show_bar=False, is_main=True)
  writer = runtime.JsonlWriter(str(tmp_path / 'metrics.jsonl'))
  train_loop._report_validation(console, writer, folder, 2, float('nan'))  # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert err.strip() == 'step 2: validation PSNR is non-finite (nan); this checkpoint never counts as best'
  assert folder.best_step() is None and not (tmp_path / 'metrics.jsonl').exists()
