"""The examples users copy run: docstrings, README's and the docs pages'.

Every module of the package is searched for docstring examples, private ones
included, and every ``>>>`` line in its source must be one doctest ran: an
example doctest cannot find (in a nested function, say) fails instead of
being skipped.

In the docs pages (MyST Markdown), every fenced ```python block runs as
written, each on its own; fragments that need a mesh, several hosts, a
checkpoint directory or a model are written as ```{code-block} python and
are only shown. The API pages list every public name.
"""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import optax_bema

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
README = ROOT / 'README.md'
# Pages that must hold at least one runnable example.
PAGES_WITH_EXAMPLES = ('getting_started.md', 'which_average.md', 'choose.md',
                       'pace.md', 'adaptive_ademamix.md', 'scaling_out.md',
                       'merging.md')
RUNNABLE = re.compile(r'^```python\n(.*?)^```', re.S | re.M)


def _examples(path):
  return RUNNABLE.findall(path.read_text())


def _run(code, name):
  exec(compile(code, name, 'exec'), {})  # pylint: disable=exec-used


MODULES = ['optax_bema'] + [
    m.name for m in pkgutil.walk_packages(optax_bema.__path__, 'optax_bema.')]
EXAMPLE_LINE = re.compile(r'^\s*>>> ', re.M)


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module)
  assert result.failed == 0
  written = len(EXAMPLE_LINE.findall(inspect.getsource(module)))
  assert result.attempted == written, (
      f'{name}: {written} example lines, doctest ran {result.attempted}')


def test_modules_with_examples_are_found():
  with_examples = {
      name for name in MODULES if EXAMPLE_LINE.search(
          inspect.getsource(importlib.import_module(name)))}
  assert {'optax_bema._fit', 'optax_bema._posthoc',
          'optax_bema._stabilizers', 'optax_bema._pace',
          'optax_bema._readout'} <= with_examples


@pytest.mark.parametrize('page', PAGES_WITH_EXAMPLES)
def test_page_has_examples(page):
  assert _examples(DOCS / page), f'docs/{page} has no runnable example'


@pytest.mark.parametrize(
    'path,index',
    [(path, i) for path in sorted(DOCS.glob('*.md'))
     for i in range(len(_examples(path)))],
    ids=lambda v: v.name if isinstance(v, pathlib.Path) else str(v))
def test_docs_example_runs(path, index):
  _run(_examples(path)[index], f'docs/{path.name} example {index}')


PRINT = re.compile(r'^\s*print\(', re.M)


@pytest.mark.parametrize('path', sorted(DOCS.glob('*.md')) + [README],
                         ids=lambda p: p.name)
def test_docs_examples_check_what_they_show(path):
  """A value an example shows is asserted, not printed: a printed value
  nobody checks drifts from the text around it."""
  blocks = RUNNABLE.findall(path.read_text())
  assert not [b for b in blocks if PRINT.search(b)], (
      f'{path.name}: a runnable example prints; assert the value instead')


def test_readme_minimal_example_runs():
  text = README.read_text()
  section = text[text.index('## A minimal example'):]
  block = RUNNABLE.search(section)
  assert block, 'no code block under ## A minimal example'
  _run(block.group(1), 'README minimal example')


def test_readme_example_is_the_docs_example():
  """README shows the getting-started page's example, word for word."""
  text = README.read_text()
  readme = RUNNABLE.search(text[text.index('## A minimal example'):])
  assert readme.group(1) in _examples(DOCS / 'getting_started.md')


def test_api_reference_lists_every_public_name():
  api = (DOCS / 'api.rst').read_text()
  for name in optax_bema.__all__:
    assert re.search(rf'^\.\. auto(function|class):: {name}$', api, re.M), (
        f'{name} has no entry in docs/api.rst')
