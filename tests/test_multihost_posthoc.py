"""Choosing the average after training on a run split over two processes.

Two processes joined by jax.distributed on loopback (2 CPU devices each)
train one model whose weights are split over all 4 devices, save snapshots
with Orbax, restore them (each process its own shards) and run
``synthesize``, ``replay`` and ``choose``. Nothing is gathered before the
models exist; they keep the params' shardings (checked in the worker) and
equal a one-process run's, to float32 rounding.
"""

import pathlib

import numpy as np
import pytest

import _workers

WORKER = pathlib.Path(__file__).with_name('_multihost_posthoc_worker.py')
TIMEOUT_S = 300


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return _workers.two_processes_and_one(
      WORKER, tmp_path_factory.mktemp('multihost_posthoc'), TIMEOUT_S,
      own_dirs=True)


def test_both_processes_hold_the_same_models(runs):
  first, second, _ = runs
  assert sorted(first) == sorted(second)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_choose_gives_every_process_the_same_table_and_model(runs):
  """choose on the restored shards: the same table on both processes, and
  the one-process run's choice."""
  first, second, one = runs
  for key in ('choose_table/scores', 'choose_table/chosen'):
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)
  np.testing.assert_array_equal(first['choose_table/chosen'],
                                one['choose_table/chosen'])
  np.testing.assert_allclose(first['choose_table/scores'],
                             one['choose_table/scores'], rtol=1e-5)


@pytest.mark.parametrize('name', ['bema', 'power', 'last3', 'ema', 'swa',
                                  'choose'])
def test_equal_to_a_one_process_run(runs, name):
  first, _, one = runs
  for k in ('w', 'b'):
    np.testing.assert_allclose(first[f'{name}/{k}'], one[f'{name}/{k}'],
                               rtol=1e-5, atol=1e-6, err_msg=f'{name}/{k}')
  # the model is not the last iterate: the comparison is not vacuous
  assert np.abs(one[f'{name}/w'] - one['params/w']).max() > 1e-3
