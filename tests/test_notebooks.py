"""Every notebook in notebooks/ runs headless, top to bottom, in its small
configuration, and is stored without outputs (so diffs stay reviewable)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits this environment: the notebooks read it to shrink.
  monkeypatch.setenv('OPTAX_BEMA_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=120, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the traceback, on failure
