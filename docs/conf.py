"""Sphinx configuration of the optax_bema documentation.

Build it (warnings are errors) with the ``docs`` extra installed:

    sphinx-build -W --keep-going -b html docs docs/_build/html

Nothing is fetched at build time: no intersphinx, no notebook execution;
and nothing when the pages are read: MathJax is copied into the build
(sphinx-mathjax-offline), so the formulas render offline.
"""

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import optax_bema

project = 'optax_bema'
author = 'optax_bema contributors'
copyright = 'optax_bema contributors'  # pylint: disable=redefined-builtin
release = version = optax_bema.__version__

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.mathjax',
    'sphinx-mathjax-offline',  # MathJax from the build, not from a CDN
    'sphinx.ext.napoleon',
    'myst_nb',  # MyST Markdown pages and the notebook, rendered unexecuted
]
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}

# A reference that does not resolve is a warning, so -W fails the build on
# it. Targets outside the public API are not documented here (nothing is
# fetched at build time, and private modules have no pages): type hints
# naming them are rendered as plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(optax|contrib|jax|jnp|np|numpy|typing)(\..*)?'),
    (r'py:.*', r'(Any|Callable|Iterable|Mapping|NamedTuple|Optional|Union)'),
    (r'py:class', r'optax_bema\._\w+\.\w+|PaceGain'),
]

# -- autodoc: the public names, from their docstrings -----------------------
autodoc_default_options = {'member-order': 'bysource'}
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- MyST and notebooks -----------------------------------------------------
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3
nb_execution_mode = 'off'  # the tests run the notebook; the docs show it

# -- HTML --------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = 'optax_bema'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
html_static_path = []

# The notebook lives in notebooks/ (Colab opens it there); Sphinx reads it
# from a copy inside the source tree.
_COLLECTED = DOCS / '_collections'
_COLLECTED.mkdir(exist_ok=True)
for _notebook in sorted((ROOT / 'notebooks').glob('*.ipynb')):
  shutil.copyfile(_notebook, _COLLECTED / _notebook.name)


def _check_every_public_name_is_documented(app, env):
  """Every name in ``optax_bema.__all__`` has an entry in the API pages."""
  documented = set(env.get_domain('py').objects)
  missing = sorted(f'optax_bema.{name}' for name in optax_bema.__all__
                   if f'optax_bema.{name}' not in documented)
  if missing:
    from sphinx.util import logging  # pylint: disable=import-outside-toplevel
    logging.getLogger(__name__).warning(
        'public names without an entry in docs/api.rst: %s', missing)


def setup(app):
  app.connect('env-check-consistency',
              _check_every_public_name_is_documented)
  return {'parallel_read_safe': True}

