"""Two processes joined by jax.distributed on loopback train one model.

Each process has 2 CPU devices of its own; the model is sharded over all 4.
Both must end with the same averaged model, equal (to float32 rounding: the
data-parallel gradient sums in another order) to a one-process run.
"""

import pathlib

import numpy as np
import pytest

import _workers

WORKER = pathlib.Path(__file__).with_name('_multihost_worker.py')
TIMEOUT_S = 180


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return _workers.two_processes_and_one(
      WORKER, tmp_path_factory.mktemp('multihost'), TIMEOUT_S)


def test_both_processes_hold_the_same_model(runs):
  first, second, _ = runs
  assert sorted(first) == sorted(second)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.mark.parametrize('name', ['adamw_bema', 'pace'])
def test_equal_to_a_one_process_run(runs, name):
  first, _, one = runs
  keys = [k for k in one if k.startswith(name + '/')]
  assert {k.split('/')[1] for k in keys} == {'params', 'averaged'}
  for key in keys:
    np.testing.assert_allclose(first[key], one[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  # the average is not the live weights: the comparison is not vacuous
  w = f'{name}/params/w'
  assert np.abs(one[w] - one[f'{name}/averaged/w']).max() > 1e-4
