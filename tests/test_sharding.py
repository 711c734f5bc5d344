"""Sharded params on an 8-device CPU mesh: state and readout keep the layout.

The mesh needs ``--xla_force_host_platform_device_count=8`` before JAX starts,
so each case runs ``_sharded_worker.py`` in its own process, with a timeout.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

import optax_bema

WORKER = pathlib.Path(__file__).with_name('_sharded_worker.py')
TIMEOUT_S = 300
# float32 rounding: the sharded and the one-device programs may fuse the
# divisions of OUEMA and BEMA's readout differently.
TOLERANCE = 1e-6


@pytest.fixture(scope='module')
def reports():
  """Both axis types, run side by side: each process compiles on its own."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(WORKER.parents[1]))
  procs = {kind: subprocess.Popen(
      [sys.executable, str(WORKER), kind], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for kind in ('explicit', 'auto')}
  deadline = time.monotonic() + TIMEOUT_S
  try:
    out = {}
    for kind, p in procs.items():
      stdout, stderr = p.communicate(
          timeout=max(1.0, deadline - time.monotonic()))
      assert p.returncode == 0, f'{kind}: {stderr[-4000:]}'
      out[kind] = json.loads(stdout.strip().splitlines()[-1])
    return out
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(params=['explicit', 'auto'])
def report(request, reports):
  return reports[request.param]


def test_eight_devices(report):
  assert report['devices'] == 8


def test_every_transform_is_covered(report):
  assert set(report['cases']) == {'ema', 'bema', 'bema_freq1', 'dema',
                                  'ouema', 'bema_offload', 'pace'}
  assert hasattr(optax_bema, 'pace')


@pytest.mark.parametrize('case', ['ema', 'bema', 'bema_freq1', 'dema', 'ouema',
                                  'bema_offload', 'pace'])
def test_state_and_average_keep_the_params_sharding(report, case):
  result = report['cases'][case]
  assert result['sharding_errors'] == []
  # the same numbers as one device, and the average did move
  assert result['params_diff'] <= TOLERANCE
  assert result['averaged_diff'] <= TOLERANCE
  assert result['averaged_moved'] > 1e-3


@pytest.mark.parametrize('case', ['bema', 'bema_freq1', 'bema_offload'])
def test_state_sharded_over_more_axes_than_params(report, case):
  """ZeRO-style: the averages split over the data axis too are supported."""
  result = report['zero'][case]
  assert result['errors'] == []
  assert result['params_diff'] <= TOLERANCE
  assert result['averaged_diff'] <= TOLERANCE


def test_synthesis_from_averages_sharded_unlike_the_params(report):
  """posthoc_ema's averages split over the data axis too: synthesize lays
  each saved array out as the params and gives one device's model."""
  result = report['zero_synthesis']
  assert result['errors'] == []
  assert result['diff'] <= TOLERANCE
