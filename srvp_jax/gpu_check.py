"""Deviceless GPU check: the real programs compiled for an H100 (or A100) on a machine without one.

JAX compiles ahead of time for a GPU it does not have: with the CUDA plugin installed and the process on
CPU (``JAX_PLATFORMS=cpu``), ``jax.experimental.topologies`` builds compile-only devices from a target
description (XLA's ``GpuTargetConfigProto``; ours ship in ``srvp_jax/gpu_targets/``), and ``jax.jit(...)
.trace(...).lower().compile()`` gives the executable XLA would run there. Nothing executes; what the
compiled program says is enough to know, before the first GPU run, whether it fits and how it is built:

* memory: arguments + outputs - aliased (donated) bytes + temporaries, from ``memory_analysis()``, against
  the device's memory less ``HEADROOM``;
* FLOPs: XLA's HLO cost analysis of the lowered (pre-optimisation) module, per step;
* a census of the optimised HLO: cuDNN convolution calls by kind (forward, backward-input,
  backward-filter), convolutions left to XLA, GEMMs (Triton fusions and cuBLAS calls), while loops, and
  the precision of the float32 convolutions and dots.

Three programs per config, each traced with the GPU layer forms (``model.backend.compile_for('gpu')``):
the train step (``srvp_jax.train``, donated state) at the training batch, the validation core
(best-of-N PSNR chunk of ``val_sample_chunk`` samples at ``batch_size_test``) and the evaluation core
(the paper's protocol: PSNR + SSIM + the float predictions LPIPS reads, at the evaluation batch, with the
sample chunk the evaluation would choose on that device from the program's own memory analysis).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import sys
import time
from importlib import metadata
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.lib import xla_client
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from srvp_jax import config as config_lib
from srvp_jax.evaluation import sampling
from srvp_jax.model import abstract_model, backend
from srvp_jax.train import step as train

TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
TARGETS = {'h100': 'h100_sxm.txtpb', 'a100': 'a100_sxm_80.txtpb'}
PROGRAMS = ('train', 'val', 'eval')
CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin')
# Device memory a program may not use: XLA's cuDNN autotuning workspace (not in the memory analysis), the
# allocator's fragmentation and the CUDA context. 10% of 80 GB is 8 GB, above what these take in practice.
HEADROOM = 0.10
EVAL_BATCH = 16  # ``python -m srvp_jax.evaluate``'s default --batch_size.
XLA_MEMORY_FRACTION = 0.75  # Of a GPU's memory, JAX's allocator limit (XLA_PYTHON_CLIENT_MEM_FRACTION's default).
# Optimised-HLO instructions (one per line): cuDNN convolutions by kind, convolutions and dots left as HLO,
# GEMM fusions (Triton) and cuBLAS calls, while loops; 'highest' when they carry Precision.HIGHEST.
CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$(conv\w*)"')
XLA_CONV = re.compile(r'\S+ convolution\(')
DOT = re.compile(r'\S+ dot\(')
GEMM_FUSION = re.compile(r'"kind":"__triton\w*gemm\w*"')
CUBLAS = re.compile(r'custom_call_target="__cublas\$\w+')
WHILE = re.compile(r'[\]}) ] while\(')
HIGHEST = 'operand_precision={highest,highest}'
# Kernel launches: the computations of an optimised module (a header line, then indented instructions), the op
# of each instruction, a loop's trip count, and the ops that launch no kernel (every other op of the entry
# computation or of a loop body does).
COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%\S+ = .*?\b([a-z][a-z0-9-]*)\(')
TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
NO_KERNEL = frozenset({'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'while', 'call',
                       'conditional', 'opt-barrier', 'after-all', 'add-dependency', 'domain'})


class CheckError(RuntimeError):
  """The deviceless check cannot run here (no CUDA plugin, a GPU backend already initialised, ...)."""


def plugin_missing() -> str | None:
  """Why the deviceless check cannot run in this environment (None: it can)."""
  if not any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS):
    return (f'the JAX CUDA plugin is not installed (pip install "jax[cuda13]=={metadata.version("jax")}"; '
            'it compiles for GPUs without one)')
  return None


def target_config(name: str) -> str:
  """The ``GpuTargetConfigProto`` text of a shipped target ('h100', 'a100')."""
  if name not in TARGETS:
    raise CheckError(f'unknown GPU target {name!r}; shipped: {", ".join(TARGETS)}')
  with open(os.path.join(TARGET_DIR, TARGETS[name]), encoding='utf-8') as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def target_mesh(name: str):
  """A one-device 'data' mesh of compile-only devices of the target (needs the plugin and a CPU process)."""
  reason = plugin_missing()
  if reason:
    raise CheckError(reason)
  if jax.default_backend() != 'cpu':
    raise CheckError('the deviceless check runs in a CPU process: set JAX_PLATFORMS=cpu')
  try:
    topo = topologies.get_topology_desc(platform='cuda', topology='1x1x1', target_config=target_config(name))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckError(f'no compile-only {name} topology from the CUDA plugin: {str(e).splitlines()[0]}') from None
  return topologies.make_mesh(topo, (1,), ('data',))


def device_memory(name: str) -> int:
  """The target's device memory in bytes (``device_memory_size`` of its target description)."""
  match = re.search(r'device_memory_size:\s*(\d+)', target_config(name))
  return int(match.group(1))


def census(hlo_text: str) -> dict[str, int]:
  """Kernel census of an optimised GPU HLO module: counts per kind of instruction (see ``CUDNN_CONV`` ...).

  'cudnn_<kind>' per cuDNN convolution kind and 'cudnn_convs' in all, 'xla_convs' (convolutions not
  given to cuDNN), 'dots' (matrix products, inside GEMM fusions or not), 'gemm_fusions', 'cublas_calls',
  'while_loops', '<x>_highest' for the convolutions and dots computed at ``Precision.HIGHEST``, and
  ``launches``' 'kernels', 'kernel_launches' and 'loop_iterations'.
  """
  out = {'cudnn_convs': 0, 'cudnn_convs_highest': 0, 'xla_convs': 0, 'dots': 0, 'dots_highest': 0,
         'gemm_fusions': 0, 'cublas_calls': 0, 'while_loops': 0}
  for line in hlo_text.splitlines():
    conv = CUDNN_CONV.search(line)
    if conv:
      key = f'cudnn_{conv.group(1)}'
      out[key] = out.get(key, 0) + 1
      out['cudnn_convs'] += 1
      out['cudnn_convs_highest'] += HIGHEST in line
    elif XLA_CONV.search(line):
      out['xla_convs'] += 1
    elif DOT.search(line):
      out['dots'] += 1
      out['dots_highest'] += HIGHEST in line
    out['gemm_fusions'] += bool(GEMM_FUSION.search(line))
    out['cublas_calls'] += bool(CUBLAS.search(line))
    out['while_loops'] += bool(WHILE.search(line))
  return out | launches(hlo_text)


def launches(hlo_text: str) -> dict[str, int]:
  """Kernels of an optimised GPU HLO module and how often one execution launches them.

  'kernels': the kernel-launching instructions (fusions, custom calls, unfused ops) of the entry computation
  and of every loop body and condition; 'kernel_launches': the same weighted by how often each runs (a loop
  body by its known trip count, its condition once more: an upper bound, the runtime may skip a condition
  whose trip count it knows); 'loop_iterations': the loop iterations of one execution, each launched from
  the host by XLA's GPU runtime. A loop of unknown trip count counts once.
  """
  computations: dict[str, list[str]] = {}
  entry, lines = None, None
  for line in hlo_text.splitlines():
    header = COMPUTATION.match(line)
    if header:
      lines = computations.setdefault(header.group(1), [])
      entry = header.group(1) if line.startswith('ENTRY') else entry
    elif lines is not None and line.startswith('  '):
      lines.append(line)
  out = {'kernels': 0, 'kernel_launches': 0, 'loop_iterations': 0}
  pending = [(entry, 1)] if entry else []
  while pending:
    name, times = pending.pop()
    for line in computations.get(name, []):
      op = INSTRUCTION.match(line)
      if op is None:
        continue
      if op.group(1) == 'while':
        trips = TRIP_COUNT.search(line)
        n = int(trips.group(1)) if trips else 1
        out['loop_iterations'] += times * n
        pending += [(re.search(r'body=%([\w.-]+)', line).group(1), times * n),
                    (re.search(r'condition=%([\w.-]+)', line).group(1), times * (n + 1))]
      elif op.group(1) == 'call':
        pending.append((re.search(r'to_apply=%([\w.-]+)', line).group(1), times))
      elif op.group(1) not in NO_KERNEL:
        out['kernels'] += 1
        out['kernel_launches'] += times
  return out


@dataclasses.dataclass
class ProgramReport:
  """What the compiled program of one config says on the target (bytes, FLOPs, census)."""
  program: str
  config: str
  dtype: str
  precision: str
  scan_unroll: int | bool  # The model's scans: steps per loop iteration, True: fully unrolled.
  batch: int
  detail: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  state_bytes: int  # Donated state (train) or model states (val / eval): the bytes that must appear once.
  flops: float | None
  compile_s: float
  census: dict[str, int]
  device_bytes: int

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= (1 - HEADROOM) * self.device_bytes

  def row(self) -> dict[str, Any]:
    """A JSON-able row (the benchmark's format: kind 'gpu_compile')."""
    return {'kind': 'gpu_compile', **dataclasses.asdict(self), 'peak_bytes': self.peak_bytes, 'fits': self.fits,
            'headroom': HEADROOM}


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _abstract(tree, sharding):
  """ShapeDtypeStructs of ``tree`` placed with ``sharding``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compile(jitted, args, report: dict) -> tuple[Any, dict]:
  """Traces (GPU layer forms), lowers and compiles ``jitted`` at ``args``; FLOPs from the lowered module."""

  t0 = time.perf_counter()
  with backend.compile_for('gpu'):
    lowered = jitted.trace(*args).lower()
  # A compile-only executable cannot be loaded back from JAX's persistent compilation cache: never write one.
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float('inf'))
  try:
    compiled = lowered.compile()
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)
  report['compile_s'] = time.perf_counter() - t0
  report['flops'] = hlo_flops(lowered)
  m = compiled.memory_analysis()
  report.update(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes))
  report['census'] = census(compiled.as_text())
  return compiled, report


def hlo_flops(lowered) -> float | None:
  """FLOPs of a lowered program: XLA's HLO cost analysis of the (pre-optimisation) module.

  A compile-only GPU client has no cost analysis (``cost_analysis()`` is None), so the module is analysed
  by the CPU client, which counts the same HLO. Loop bodies count once (scans are undercounted; their
  dense layers are well under 1% of a step). None when this jaxlib cannot analyse it.
  """
  try:
    cost = xla_client._xla.hlo_module_cost_analysis(  # pylint: disable=protected-access
        jax.devices('cpu')[0].client, lowered.compiler_ir('hlo').get_hlo_module())
  except Exception:  # pylint: disable=broad-except
    return None
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  return flops if flops > 0 else None


def _scan_unroll(cfg: Mapping[str, Any]) -> int | bool:
  """The model's scan unrolling on a GPU (the config's, else the GPU default)."""
  return cfg.get('scan_unroll', 0) or backend.SCAN_UNROLL['gpu']


def _abstract_model(cfg: Mapping[str, Any]):
  """The model's graphdef and abstract (shape-only) parameters and other variables: nothing is initialised."""
  return nnx.split(abstract_model(cfg), nnx.Param, ...)


def check_train(cfg: Mapping[str, Any], target: str = 'h100', label: str | None = None) -> ProgramReport:
  """The train step of ``srvp_jax.train`` (jitted as in training: state replicated and donated)."""

  mesh = target_mesh(target)
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  graphdef, params, stats = _abstract_model(cfg)
  tx = train.make_optimizer(cfg)
  state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=jax.eval_shape(tx.init, params), bad_step=jax.ShapeDtypeStruct((), jnp.int32))
  batch, nt = int(cfg['batch_size']), int(cfg['seq_len'])
  args = (_abstract(state, rep), jax.ShapeDtypeStruct((batch, nt, 64, 64, int(cfg['nc'])), jnp.float32, sharding=data),
          _abstract(jax.eval_shape(lambda: jax.random.key(0)), rep))
  jitted = train.jit_train_step(train.make_train_step(graphdef, cfg, tx), mesh)
  _, report = _compile(jitted, args, {})
  return ProgramReport(program='train', config=label or str(cfg['dataset']), dtype=str(cfg['compute_dtype']),
                       precision=str(cfg['precision']),
                       scan_unroll=_scan_unroll(cfg), batch=batch, detail=f'{nt} frames, donated state',
                       state_bytes=_bytes(state), device_bytes=device_memory(target), **report)


def _best_of_n(cfg, target: str, protocol, states, batch: int, nt: int, chunk: int):
  """Compiles the best-of-N chunk function (a fresh jit: GPU forms) for ``chunk`` samples of ``batch`` videos."""

  mesh = target_mesh(target)
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  graphdef, states = states
  fn = sampling.chunk_function.__wrapped__(graphdef, protocol, mesh)
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  args = (_abstract(tuple(states), rep), _abstract(key_data, rep),
          jax.ShapeDtypeStruct((batch, nt, 64, 64, int(cfg['nc'])), jnp.float32, sharding=data),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
          jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=rep),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  return _compile(fn, args, {})[1]


def check_val(cfg: Mapping[str, Any], target: str = 'h100', label: str | None = None) -> ProgramReport:
  """Training's validation core: one chunk of ``val_sample_chunk`` samples of ``batch_size_test`` videos."""
  graphdef, params, stats = _abstract_model(cfg)
  nt, nt_cond, n_euler = config_lib.seq_len_test(cfg), int(cfg['nt_cond']), int(cfg['n_euler_steps'])
  protocol = sampling.Protocol(nt_cond=nt_cond, nt_pred=nt - nt_cond, n_euler_steps=n_euler, cond_euler_steps=n_euler,
                               metrics=('psnr',), select_on='all', keep_videos=False)
  batch = int(cfg['batch_size_test'])
  chunk = max(1, min(int(cfg['val_sample_chunk']), int(cfg['n_samples_test'])))
  report = _best_of_n(cfg, target, protocol, (graphdef, (params, stats)), batch, nt, chunk)
  return ProgramReport(program='val', config=label or str(cfg['dataset']), dtype=str(cfg['compute_dtype']),
                       precision=str(cfg['precision']),
                       scan_unroll=_scan_unroll(cfg), batch=batch, detail=f'{nt} frames, {chunk} samples per chunk',
                       state_bytes=_bytes((params, stats)), device_bytes=device_memory(target), **report)


def check_eval(cfg: Mapping[str, Any], target: str = 'h100', label: str | None = None,
               batch: int = EVAL_BATCH) -> ProgramReport:
  """The evaluation core (paper protocol) with the sample chunk the evaluation would pick on the target.

  As ``sampling.auto_chunk`` on that GPU: a probe of ``PROBE_SAMPLES`` samples is compiled, its temporaries and
  outputs per sample against ``DEVICE_MEMORY_FRACTION`` of the allocator's free memory (``XLA_MEMORY_FRACTION``
  of the device less the model) give the chunk, which is compiled.
  """

  graphdef, params, stats = _abstract_model(cfg)
  graphdef, state = nnx.split(nnx.merge(graphdef, params, stats))
  test = config_lib.test_protocol(cfg)
  nt, nt_cond, n_euler = test['nt_gen'], test['nt_cond'], int(cfg['n_euler_steps'])
  protocol = sampling.Protocol(nt_cond=nt_cond, nt_pred=nt - nt_cond, n_euler_steps=n_euler, cond_euler_steps=n_euler,
                               metrics=('psnr', 'ssim'), keep_float=True)
  n_samples, k0 = test['n_samples'], min(sampling.PROBE_SAMPLES, test['n_samples'])
  probe = _best_of_n(cfg, target, protocol, (graphdef, (state,)), batch, nt, k0)
  per_chunk = probe['temp_bytes'] + probe['output_bytes']
  free = sampling.DEVICE_MEMORY_FRACTION * (XLA_MEMORY_FRACTION * device_memory(target) - probe['argument_bytes'])
  k = int(np.clip(free * k0 // max(per_chunk, 1), 1, n_samples))
  chunk = -(-n_samples // -(-n_samples // k))
  report = probe if chunk == k0 else _best_of_n(cfg, target, protocol, (graphdef, (state,)), batch, nt, chunk)
  if chunk != k0:
    report['compile_s'] += probe['compile_s']
  return ProgramReport(program='eval', config=label or str(cfg['dataset']), dtype=str(cfg['compute_dtype']),
                       precision=str(cfg['precision']),
                       scan_unroll=_scan_unroll(cfg), batch=batch,
                       detail=f'{nt} frames, {chunk} of {n_samples} samples per chunk',
                       state_bytes=_bytes(state), device_bytes=device_memory(target), **report)


CHECKS = {'train': check_train, 'val': check_val, 'eval': check_eval}


def _gib(n: int | float | None) -> str:
  return '-' if n is None else f'{n / 2**30:.2f}'


def format_table(reports: list[ProgramReport], target: str) -> str:
  """The check's table: one line per program (memory against the device, FLOPs, census)."""
  device = device_memory(target)
  lines = [f'deviceless compile for {target} ({device / 2**30:.1f} GiB; fits: peak <= {1 - HEADROOM:.0%} of it); '
           'peak = arguments + outputs - donated + temporaries, before cuDNN autotuning workspace; launches: '
           'kernel launches per run',
           f'{"config":22} {"program":7} {"dtype":8} {"precision":13} {"unroll":>6} {"batch":>5} {"peak GiB":>8} '
           f'{"fits":>4} {"TFLOP":>7} {"cuDNN fwd/bwd-in/bwd-filt":>25} {"XLA conv":>8} {"dots (highest)":>14} '
           f'{"GEMM fus":>8} {"while":>5} {"launches":>8} {"compile s":>9}  detail']
  for r in reports:
    c = r.census
    convs = '/'.join(str(c.get(f'cudnn_{k}', 0)) for k in ('convForward', 'convBackwardInput', 'convBackwardFilter'))
    highest = f"{c['dots']} ({c['dots_highest']})"
    flops = '-' if r.flops is None else f'{r.flops / 1e12:.3f}'
    precision = r.precision if r.dtype == 'float32' else '-'
    unroll = 'full' if r.scan_unroll is True else str(r.scan_unroll)
    lines.append(f'{r.config:22} {r.program:7} {r.dtype:8} {precision:13} {unroll:>6} {r.batch:5d} '
                 f'{_gib(r.peak_bytes):>8} {"yes" if r.fits else "NO":>4} {flops:>7} {convs:>25} {c["xla_convs"]:8d} '
                 f'{highest:>14} {c["gemm_fusions"]:8d} {c["while_loops"]:5d} {c["kernel_launches"]:8d} '
                 f'{r.compile_s:9.1f}  {r.detail}')
  return '\n'.join(lines)


def main(configs: Mapping[tuple[str, str], Any], target: str, programs: list[str], json_path: str | None,
         progress) -> int:
  """``python -m srvp_jax.benchmark --target``: compiles ``programs`` of each (config, dtype) for ``target``.

  Prints the table; exit status 0, 1 when a program would not fit (one ``error:`` line each) or a compile
  failed, 2 when the check cannot run here (no CUDA plugin, ...).
  """

  jax.config.update('jax_platforms', 'cpu')  # Compile-only GPU devices come from a CPU process.
  try:
    target_mesh(target)
  except CheckError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  reports, errors = [], []
  for (name, dtype), cfg in configs.items():
    for program in programs:
      progress(f'{target} {program} {name} {dtype} ({cfg.precision})')
      try:
        r = CHECKS[program](cfg, target, label=name)
      except Exception as e:  # pylint: disable=broad-except
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        errors.append(f'{name} {program} {dtype}: compilation for {target} failed: {text}')
        continue
      progress(f'  peak {_gib(r.peak_bytes)} GiB, compile {r.compile_s:.1f} s')
      reports.append(r)
      if not r.fits:
        errors.append(f'{name} {program} {dtype} needs {_gib(r.peak_bytes)} GiB on the {target} '
                      f'(limit {_gib((1 - HEADROOM) * r.device_bytes)} GiB: {HEADROOM:.0%} headroom)')
  print(format_table(reports, target))
  if json_path:
    info = {'target': target, 'device_memory_bytes': device_memory(target), 'jax': jax.__version__,
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    with open(json_path, 'w', encoding='utf-8') as f:
      json.dump({**info, 'rows': [r.row() for r in reports]}, f, indent=1)
    progress(f'wrote {json_path}')
  for e in errors:
    print(f'error: {e}', file=sys.stderr)
  return 1 if errors else 0
