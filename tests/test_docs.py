"""The examples users copy run: docstrings, README's and the docs pages'.

In the docs pages (MyST Markdown), every fenced ```python block runs as
written, each on its own; fragments that need a mesh, several hosts, a
checkpoint directory or a model are written as ```{code-block} python and
are only shown. The API pages list every public name.
"""

import doctest
import pathlib
import re

import pytest

import optax_bema
from optax_bema import _adaptive_ademamix
from optax_bema import _pace
from optax_bema import _posthoc
from optax_bema import _readout
from optax_bema import _stabilizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
README = ROOT / 'README.md'
# Pages that must hold at least one runnable example.
PAGES_WITH_EXAMPLES = ('getting_started.md', 'which_average.md', 'pace.md',
                       'adaptive_ademamix.md', 'scaling_out.md')
RUNNABLE = re.compile(r'^```python\n(.*?)^```', re.S | re.M)


def _examples(path):
  return RUNNABLE.findall(path.read_text())


def _run(code, name):
  exec(compile(code, name, 'exec'), {})  # pylint: disable=exec-used


@pytest.mark.parametrize('module', [_readout, _stabilizers, _pace,
                                    _adaptive_ademamix, _posthoc])
def test_docstring_examples(module):
  result = doctest.testmod(module)
  assert result.attempted > 0
  assert result.failed == 0


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
