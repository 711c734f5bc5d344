"""A saved averages state keeps restoring: the record format is versioned.

``data/posthoc_v1`` holds Orbax snapshots of a short run saved by this
version (``data/make_posthoc_checkpoint.py``), the averages' record format 1.
They must keep restoring, with and without an Orbax target, and keep
synthesizing: a tracked average comes back as it was saved, an untracked
one as the reference loop computes it from the run's iterates.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import optax_bema
from optax_bema import _averages

import _oracle

DATA = pathlib.Path(__file__).parent / 'data' / 'posthoc_v1'
STEPS = (0, 10, 20, 30, 35, 38, 39, 40)


def _tracked():
  return optax_bema.posthoc_ema(ema_powers=(0.3, 0.9), stds=(0.1,))


def _restore(with_target: bool):
  checkpointer = ocp.StandardCheckpointer()
  params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
  target = {'opt_state': _tracked().init(params), 'params': params}
  out = []
  for step in STEPS:
    saved = (checkpointer.restore(DATA / f'step_{step}', target)
             if with_target else checkpointer.restore(DATA / f'step_{step}'))
    out.append((saved['opt_state'], saved['params']))
  return out


def _iterates():
  data = np.load(DATA / 'iterates.npz')
  return data['w'], data['b']


@pytest.mark.parametrize('with_target', [True, False])
def test_the_saved_run_synthesizes_as_it_was_trained(with_target):
  snapshots = _restore(with_target)
  w, b = _iterates()
  targets = {'tracked': optax_bema.power_ema(0.1),
             'ema': optax_bema.ema(ema_power=0.5, update_freq=1)}
  got = optax_bema.synthesize(targets, snapshots)
  saved = snapshots[-1][0]
  members = saved.members if with_target else saved['members']
  tracked_ema = (members['std=0.1'].ema if with_target
                 else members['std=0.1']['ema'])
  np.testing.assert_allclose(got.model['tracked']['w'], tracked_ema['w'],
                             atol=1e-6)
  want = _oracle.trajectory_models('ema', w, ema_power=0.5,
                                   update_freq=1)[-1]
  np.testing.assert_allclose(got.model['ema']['w'], want, atol=2e-3)
  assert got.model['ema']['b'].shape == b[-1].shape


def test_the_record_says_what_it_holds():
  opt_state, _ = _restore(True)[-1]
  record = json.loads(bytes(np.asarray(opt_state.settings['std=0.1'])))
  assert record == {'format': 1, 'kind': 'power_ema',
                    'settings': {'std': 0.1, 'update_after': 0,
                                 'update_freq': 1}}


def test_a_record_of_an_unknown_format_is_refused():
  text = json.dumps({'format': 99, 'kind': 'ema', 'settings': {}})
  with pytest.raises(ValueError, match='format 99.*Upgrade optax_bema'):
    _averages.decode(np.frombuffer(text.encode(), np.uint8), 'test')


def test_a_record_cast_to_bfloat16_and_back_still_reads_exactly():
  opt_state, _ = _restore(True)[-1]
  cast = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), opt_state)
  rule, schedule = _averages.decode(
      jnp.asarray(cast.settings['ema_power=0.3'], jnp.float32), 'test')
  assert rule.name == 'ema' and schedule.ema_power == 0.3


def test_the_fixture_matches_its_generator():
  """The saved run is the one the generator describes (a guard against
  regenerating the fixture by accident with other settings)."""
  w, _ = _iterates()
  assert w.shape == (41, 3)
  snapshots = _restore(True)
  assert [int(s.members['initial'].count) for s, _ in snapshots] == list(
      STEPS)
  assert isinstance(snapshots[0][0], optax_bema.AveragesState)
