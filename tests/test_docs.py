"""The examples users copy: docstrings and README's self-contained blocks run."""

import doctest
import pathlib
import re

import pytest

from optax_bema import _adaptive_ademamix, _pace, _readout, _stabilizers

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
# Sections whose code runs as written (the scaling ones need a mesh or hosts).
RUNNABLE = ('## A minimal example', '## PACE', '## Adaptive AdEMAMix')


@pytest.mark.parametrize('module', [_readout, _stabilizers, _pace,
                                    _adaptive_ademamix])
def test_docstring_examples(module):
  result = doctest.testmod(module)
  assert result.attempted > 0
  assert result.failed == 0


@pytest.mark.parametrize('section', RUNNABLE)
def test_readme_example_runs(section):
  text = README.read_text()
  start = text.index(section)
  block = re.search(r'```python\n(.*?)```', text[start:], re.S)
  assert block, f'no code block under {section}'
  exec(compile(block.group(1), f'README {section}', 'exec'), {})  # pylint: disable=exec-used
