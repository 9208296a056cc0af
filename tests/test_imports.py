"""The package's import graph: no cycles, and data preparation above the streaming side, never below it.

The graph is read from the source (``ast``): every ``import`` / ``from ... import`` of a ``srvp_jax``
module, at the top of a module or inside a function, is an edge, so that a cycle hidden behind a
function-level import is found too.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'srvp_jax'


def modules() -> dict[str, str]:
  """Module name -> file of every module of the package (``pkg`` for ``pkg/__init__.py``)."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
        out[module[:-len('.__init__')] if module.endswith('.__init__') else module] = path
  return out


def imported(module: str, path: str, known: dict[str, str]) -> set[str]:
  """The package's modules ``module`` imports (a name imported from a package counts as its submodule)."""
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  names = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      names.update(f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base for alias in node.names)
  out = set()
  for name in names:
    while name and name not in known:  # A module's attribute -> the module.
      name = name.rpartition('.')[0]
    if name and name != module:
      out.add(name)
  return out


@pytest.fixture(scope='module')
def graph() -> dict[str, set[str]]:
  known = modules()
  return {module: imported(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each a list of module names."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  source = tmp_path / 'probe.py'
  source.write_text('import numpy as np\nfrom srvp_jax import cli\nfrom . import store\n\n\ndef f():\n'
                    '  from srvp_jax.model import build_model\n  return build_model\n')
  assert imported('srvp_jax.data.probe', str(source), modules()) == {'srvp_jax.cli', 'srvp_jax.data.store',
                                                                     'srvp_jax.model'}


def test_no_import_cycles(graph):
  assert cycles(graph) == []


def test_the_streaming_side_never_imports_the_preparation(graph):
  # srvp_jax/data/__main__.py is the ``python -m srvp_jax.data`` entry point of the data CLI: no module imports it.
  streaming = {m: deps for m, deps in graph.items() if m.startswith('srvp_jax.data') and m != 'srvp_jax.data.__main__'}
  assert 'srvp_jax.data.kth' in streaming and 'srvp_jax.preparation.kth' in graph
  assert {m: sorted(d for d in deps if d.startswith('srvp_jax.preparation')) for m, deps in streaming.items()
          if any(d.startswith('srvp_jax.preparation') for d in deps)} == {}


def test_training_validation_and_evaluation_need_no_preparation(graph):
  def reach(module, seen):
    for dep in graph[module]:
      if dep not in seen:
        seen.add(dep)
        reach(dep, seen)
    return seen
  for entry in ('srvp_jax.train', 'srvp_jax.evaluate', 'srvp_jax.predict'):
    assert not [m for m in reach(entry, set()) if m.startswith('srvp_jax.preparation')], entry


# The imports left inside functions, each with its reason; every other import is at the top of its module
# (TensorFlow, TensorFlow Datasets, lpips and torch come from ``srvp_jax.import_order``'s functions).
IN_FUNCTION = {
    ('srvp_jax.cli', 'jax'): 'compilation_cache: the parsers and --help stay fast without JAX',
    ('srvp_jax.data.mnist', 'sklearn.datasets'): 'seconds to import; the stand-in digits only',
    ('srvp_jax.data.pipeline', 'grain'): 'seconds to import; the training stream only',
    ('srvp_jax.train.runtime', 'clu.metric_writers'): 'imports TensorFlow: after import_order.import_tensorflow()',
    ('srvp_jax.train.runtime', 'clu.periodic_actions'): 'the same',
    ('srvp_jax.benchmark', 'srvp_jax.torch_srvp'): 'imports torch (~4 s): the PyTorch baseline only',
}


def in_function_imports(path: str) -> set[str]:
  """The names imported inside functions of a file ('pkg.name' for ``from pkg import name``)."""
  found = set()

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if in_function and isinstance(child, ast.Import):
        found.update(alias.name for alias in child.names)
      elif in_function and isinstance(child, ast.ImportFrom):
        found.update(f'{child.module}.{alias.name}' for alias in child.names)
      visit(child, inside)

  visit(ast.parse(open(path, encoding='utf-8').read(), path), False)
  return found


def test_imports_are_at_module_top_but_an_allow_list(tmp_path):
  probe = tmp_path / 'probe.py'
  probe.write_text('import os\n\n\nclass A:\n  def f(self):\n    import torch\n    return lambda: torch\n\n\n'
                   'def g():\n  from srvp_jax import torch_srvp\n  return torch_srvp\n')
  assert in_function_imports(str(probe)) == {'torch', 'srvp_jax.torch_srvp'}
  files = dict(modules(), launch=os.path.join(ROOT, 'launch.py'),
               convert_torch_ckpt=os.path.join(ROOT, 'convert_torch_ckpt.py'))
  found = {(module, name) for module, path in files.items() for name in in_function_imports(path)}
  assert found == set(IN_FUNCTION), f'new: {sorted(found - set(IN_FUNCTION))}, gone: {sorted(set(IN_FUNCTION) - found)}'


def test_a_training_process_imports_tensorflow_without_torch():
  """launch.py declares it never imports torchvision: TensorBoard's TensorFlow comes without torch (~4 s of
  start-up), and a later request for torchvision is refused in one line instead of crashing the process."""
  script = ('import sys\n'
            'from srvp_jax import import_order\n'
            'import_order.without_torchvision()\n'
            'import_order.import_tensorflow()\n'
            'assert "torch" not in sys.modules and "torchvision" not in sys.modules, "torch was imported"\n'
            'try:\n'
            '  import_order.import_lpips()\n'
            'except import_order.ImportOrderError as e:\n'
            '  print("refused:", e)\n')
  res = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith('refused: torchvision crashes once TensorFlow is imported'), res.stdout
