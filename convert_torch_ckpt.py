"""Converts official PyTorch SRVP checkpoints into our checkpoint folders, and back.

Official -> ours (the folder then works with evaluation, fine-tuning and ``--to_torch``)::

    python convert_torch_ckpt.py XP_DIR --out OUT [--model_name model_best.pt]
    python convert_torch_ckpt.py --checkpoint model.pt --config config.json --out OUT

XP_DIR is an official experiment folder (``config.json`` next to the checkpoint). OUT receives our
config and the model as step 0, loadable with ``checkpoints.load_model(OUT, 'latest')`` (or 'best').

Ours -> official (``model.pt`` state_dict and ``config.json`` that the official ``test.py`` reads)::

    python convert_torch_ckpt.py OUR_DIR --to_torch --out OUT_DIR [--checkpoint best|latest|STEP]

OUT is new, empty or an earlier output of this converter (replaced as a whole, atomically); anything else
only with ``--overwrite``, and never the input folder. Conversion is lossless in both directions. Errors are
one ``error: ...`` line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Conversion is host work; never grab an accelerator.

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srvp_jax import checkpoints, cli
from srvp_jax import config as config_lib
from srvp_jax import convert, out_folder
from srvp_jax.model import build_model, param_count

# pylint: enable=wrong-import-position

OFFICIAL_MODEL = 'model.pt'
MARKER = '.srvp_converted.json'  # Written in every output: the folder is this converter's (is_converted).
WRITES = {MARKER, OFFICIAL_MODEL, checkpoints.CONFIG_FILE, checkpoints.OFFICIAL_CONFIG_FILE, checkpoints.CHECKPOINT_DIR}
TOOL = 'convert_torch_ckpt.py'


def is_converted(path: str) -> bool:
  """Whether ``path`` holds an earlier output of this converter and nothing else (then it may be replaced)."""
  names = set(os.listdir(path))
  return MARKER in names and names <= WRITES


def _mark(folder: str, direction: str, source: str) -> None:
  with open(os.path.join(folder, MARKER), 'w', encoding='utf-8') as f:
    json.dump({'tool': TOOL, 'direction': direction, 'source': os.path.abspath(source)}, f, indent=1)


def _folder_of(path: str) -> str:
  return os.path.dirname(os.path.abspath(path))


def _describe(model, cfg) -> str:
  return (f"{param_count(model):,} parameters, archi={cfg['archi']}, skipco={cfg['skipco']}, nc={cfg['nc']}, "
          f"ny={cfg['ny']}, nz={cfg['nz']}")


def blank_model(cfg):
  """The model of ``cfg`` filled with zeros, skipping the random initialisation.

  Conversion overwrites every variable, and the eager initialisation of a model compiles dozens
  of small XLA programs (tens of seconds on CPU) for values that would be thrown away.
  """
  model = nnx.eval_shape(lambda: build_model(cfg))
  nnx.update(model, jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), nnx.state(model)))
  return model


def to_ours(checkpoint: str, config_path: str, out: str, overwrite: bool = False) -> str:
  """Official ``checkpoint`` + ``config_path`` -> our folder ``out`` (model saved as step 0)."""
  out_folder.check(out, is_converted, TOOL, overwrite, inputs=(_folder_of(checkpoint), _folder_of(config_path)))
  cfg = config_lib.load_official_json(config_path)
  model = convert.load_state_dict(blank_model(cfg), convert.load_torch_file(checkpoint), cfg)
  with out_folder.replaced(out) as tmp:
    folder = checkpoints.RunFolder(tmp)
    try:
      folder.save_config(cfg)
      folder.save(0, checkpoints.model_tree(model), meta={'step': 0, 'source': os.path.abspath(checkpoint)})
    finally:
      folder.close()
    _mark(tmp, 'to_ours', checkpoint)
  return f'converted {checkpoint} -> {out} (step 0): {_describe(model, cfg)}'


def to_torch(workdir: str, which: str, out: str, overwrite: bool = False) -> str:
  """Our folder ``workdir`` (checkpoint ``which``) -> official ``out/model.pt`` + ``out/config.json``."""
  if os.path.isdir(workdir) and checkpoints.RunFolder(workdir).is_official():
    raise checkpoints.CheckpointNotFoundError(f'{workdir} is already an official experiment folder (config.json + '
                                              '.pt): nothing to export; drop --to_torch to convert it to ours')
  out_folder.check(out, is_converted, TOOL, overwrite, inputs=(workdir,))
  model, cfg, step = checkpoints.load_model(workdir, which)
  with out_folder.replaced(out) as tmp:
    convert.save_torch_file(convert.state_dict_from_model(model), os.path.join(tmp, OFFICIAL_MODEL))
    checkpoints.RunFolder(tmp).save_official_config(cfg)
    _mark(tmp, 'to_torch', workdir)
  return (f'exported {workdir} ({which}, step {step}) -> {os.path.join(out, OFFICIAL_MODEL)} + config.json: '
          f'{_describe(model, cfg)}')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli.Parser(prog='convert_torch_ckpt.py', description=__doc__.split('\n\n')[0],
                      examples='examples:\n\n' + '\n\n'.join(__doc__.split('\n\n')[1:]))
  parser.add_argument('folder', nargs='?', help='official experiment folder (or ours with --to_torch)')
  parser.add_argument('--out', required=True, help='folder to write')
  parser.add_argument('--model_name', default=OFFICIAL_MODEL, help='checkpoint file inside XP_DIR')
  parser.add_argument('--checkpoint', help='official checkpoint file; with --to_torch: best, latest or a step')
  parser.add_argument('--config', help='official config.json (with --checkpoint PATH)')
  parser.add_argument('--to_torch', action='store_true', help='export our folder as an official checkpoint')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a non-empty --out folder that is not an earlier output of this converter')
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
  """Performs the conversion ``args`` describe; returns the summary line."""
  if args.to_torch:
    if not args.folder or args.config:
      raise cli.UsageError('--to_torch takes our checkpoint folder as its only positional argument (no --config)')
    if not os.path.isdir(args.folder):
      raise cli.UsageError(f'checkpoint folder not found: {args.folder}')
    return to_torch(args.folder, args.checkpoint or 'best', args.out, args.overwrite)
  if args.folder:
    if args.checkpoint or args.config:
      raise cli.UsageError('give either XP_DIR or --checkpoint PATH --config PATH, not both')
    if not os.path.isdir(args.folder):
      raise cli.UsageError(f'experiment folder not found: {args.folder}')
    return to_ours(os.path.join(args.folder, args.model_name), os.path.join(args.folder, 'config.json'), args.out,
                   args.overwrite)
  if not (args.checkpoint and args.config):
    raise cli.UsageError('give XP_DIR, or both --checkpoint PATH and --config PATH')
  return to_ours(args.checkpoint, args.config, args.out, args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one conversion; returns the exit status (2: bad input, found before anything is written; 1: the output
  could not be written; 130: interrupted, any earlier output left as it was)."""
  return cli.main(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  cli.start(args.verbose)
  try:
    summary = run(args)
  except (convert.CheckpointError, config_lib.ConfigError, checkpoints.CheckpointNotFoundError,
          FileNotFoundError) as e:
    raise cli.UsageError(str(e)) from None
  print(summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
