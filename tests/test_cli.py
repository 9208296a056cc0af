"""The shared command-line layer (srvp_jax.cli, srvp_jax.import_order) and every argparse tool through it."""

import argparse
import logging
import sys

import pytest
from absl import logging as absl_logging

import convert_torch_ckpt
from srvp_jax import benchmark, cli, evaluate, import_order, parity, predict
from srvp_jax.preparation import cli as data_cli

TOOLS = {'convert_torch_ckpt.py': convert_torch_ckpt.main, 'python -m srvp_jax.evaluate': evaluate.main,
         'python -m srvp_jax.predict': predict.main, 'python -m srvp_jax.benchmark': benchmark.main,
         'python -m srvp_jax.parity': parity.main, 'python -m srvp_jax.data': data_cli.main}
# Arguments each tool requires (the bad option comes after them).
REQUIRED = {'convert_torch_ckpt.py': ['XP_DIR', '--out', 'OUT'],
            'python -m srvp_jax.evaluate': ['CKPT', '--data_dir', 'D'],
            'python -m srvp_jax.predict': ['future', 'CKPT', '--input', 'CLIP', '--n_future', '1'],
            'python -m srvp_jax.benchmark': [], 'python -m srvp_jax.parity': ['GOLDEN_DIR'],
            'python -m srvp_jax.data': ['inspect', 'kth', '--data_dir', 'D']}


def _body(exc):
  def body(argv):
    raise exc
  return body


@pytest.mark.parametrize('exc, code', [(cli.UsageError('no such folder x'), 2), (cli.Failure('out of memory'), 1)])
def test_main_turns_errors_into_one_line_and_an_exit_status(capsys, exc, code):
  assert cli.main(_body(exc), []) == code
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err == f'error: {exc}\n'


def test_main_lets_other_exceptions_through():
  with pytest.raises(KeyError):
    cli.main(_body(KeyError('bug')), [])


def test_parser_errors_name_the_help_of_their_own_command(capsys):
  p = cli.Parser(prog='tool', examples='examples:\n  tool run --n 2', verbose=False)
  run = p.add_subparsers(dest='command', required=True).add_parser('run', verbose=True)
  run.add_argument('--n', type=int, required=True)
  assert p.parse_args(['run', '--n', '2', '--verbose']).verbose
  with pytest.raises(cli.UsageError, match=r"^argument --n: invalid int value: 'x' \(see tool run --help\)$"):
    p.parse_args(['run', '--n', 'x'])
  with pytest.raises(cli.UsageError, match=r'\(see tool --help\)$'):
    p.parse_args(['walk'])
  with pytest.raises(SystemExit):
    p.parse_args(['--help'])
  assert capsys.readouterr().out.rstrip().endswith('examples:\n  tool run --n 2')


def test_first_line():
  assert cli.first_line(RuntimeError('  first\nsecond')) == 'first'
  assert cli.first_line(RuntimeError()) == 'RuntimeError'
  assert cli.first_line(RuntimeError('x' * 500)) == 'x' * 300
  assert cli.first_line(RuntimeError('x' * 500), limit=None) == 'x' * 500


def test_quiet_libraries_keeps_our_records_and_libraries_errors():
  cli.quiet_libraries()
  cli.quiet_libraries()  # Idempotent: one filter.
  handler = absl_logging.get_absl_handler()
  assert handler.filters.count(cli._ours) == 1  # pylint: disable=protected-access

  def record(path, level):
    return logging.LogRecord('x', level, path, 1, 'message', None, None)
  assert cli._ours(record('/x/srvp_jax/train.py', logging.WARNING))  # pylint: disable=protected-access
  assert not cli._ours(record('/site-packages/orbax/base.py', logging.WARNING))  # pylint: disable=protected-access
  assert cli._ours(record('/site-packages/jax/base.py', logging.ERROR))  # pylint: disable=protected-access
  # orbax's errors come back to our code as exceptions (one line each): its own records would repeat them.
  assert not cli._ours(record('/site-packages/orbax/base.py', logging.ERROR))  # pylint: disable=protected-access


def test_torch_first_refuses_once_tensorflow_came_first(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', object())
  monkeypatch.delitem(sys.modules, 'torchvision', raising=False)
  with pytest.raises(import_order.ImportOrderError, match='fresh process'):
    import_order.import_torch_first()
  with pytest.raises(cli.UsageError, match='fresh process'):
    cli.start(verbose=True, torch_first=True)


@pytest.mark.parametrize('prog', sorted(TOOLS))
def test_every_tool_reports_a_bad_option_in_one_line_with_status_2(capsys, prog):
  assert TOOLS[prog](REQUIRED[prog] + ['--no_such_option']) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.count('\n') == 1 and captured.err.startswith('error: ')
  assert '--no_such_option' in captured.err and f'(see {prog}' in captured.err


@pytest.mark.parametrize('prog', sorted(TOOLS))
def test_every_tool_help_ends_with_an_example(capsys, prog):
  argv = ['future', '--help'] if 'predict' in prog else ['--help']
  with pytest.raises(SystemExit) as exit_info:
    TOOLS[prog](argv)
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  tail = out[out.rindex('example'):]
  assert prog.split()[-1] in tail and '--verbose' in out, out


def test_number_types_say_what_is_expected():
  positive = cli.number(int, 1, 'a positive integer')
  assert positive('3') == 3
  with pytest.raises(argparse.ArgumentTypeError, match=r"^'x' is not an integer$"):
    positive('x')
  with pytest.raises(argparse.ArgumentTypeError, match=r'^0 must be a positive integer$'):
    positive('0')
  rate = cli.number(float, 0, '> 0', strict=True)
  assert rate('2.5') == 2.5
  with pytest.raises(argparse.ArgumentTypeError, match=r"^'fast' is not a number$"):
    rate('fast')
  with pytest.raises(argparse.ArgumentTypeError, match=r'^0 must be > 0$'):
    rate('0')


def test_compilation_cache_folder_is_jax_variable_else_the_user_cache(monkeypatch, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'given'))
    assert cli.compilation_cache() == str(tmp_path / 'given')
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert cli.compilation_cache() == str(tmp_path / 'xdg' / 'srvp_jax' / 'jax')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'xdg' / 'srvp_jax' / 'jax')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
