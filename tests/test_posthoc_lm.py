"""The language-model post-hoc study runs end to end (a tiny smoke run).

The numbers of a few steps of a random model mean nothing; what is checked
is the structure, and the one identity the study rests on: the grid's models
computed from their profiles equal the stabilizers run online.
"""

import math
import pathlib
import sys

import numpy as np
import optax
import pytest

import optax_bema

BENCHMARKS = pathlib.Path(__file__).parent.parent / 'benchmarks'
sys.path[:0] = [str(BENCHMARKS / 'lm'), str(BENCHMARKS)]
# pylint: disable=g-import-not-at-top,wrong-import-position
import _lm
import _posthoc_report
import _runs
import posthoc

BASE = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
            update_after=0)
CONFIG = dict(model=_lm.ModelConfig(width=16, layers=1, heads=2, context=8),
              steps=7, batch=2, eval_windows=3, seeds=1, first_seed=0)


@pytest.fixture(scope='module')
def results():
  model = _lm.Transformer(CONFIG['model'])
  train, held_out = _lm.split(_lm.pydoc_topics()[:20_000])
  return posthoc.study(
      'smoke', CONFIG, model, _lm.init_params(model), optax.adamw(1e-2),
      train, held_out, base=BASE, update_freq=1, desc='smoke')


def _is_candidate(name, names):
  """A grid setting, or one of choose's own rows (its defaults, refined
  between them, the tracked averages and the last iterate)."""
  families = {family for _, family, _ in optax_bema.default_candidates(
      CONFIG['steps']).values()}
  return name in names or name.split(' ')[0] in families | {'tracked',
                                                             'last'}


def test_choice_is_a_candidate_and_losses_are_finite(results):
  names = set(posthoc.grid(**posthoc.GRIDS['smoke'], base=BASE))
  assert results['grid']['size'] == len(names) == 16
  seed = results['per_seed'][0]
  assert _is_candidate(seed['posthoc']['name'], names)
  for key in ('posthoc', 'exact_choice', 'hindsight'):
    assert 1 <= seed[key]['held_out_rank'] <= len(names) + 1
  for key in ('exact_choice', 'hindsight'):
    assert seed[key]['name'] in names
  assert seed['hindsight']['held_out_rank'] == 1
  for label, row in results['summary']['rows'].items():
    # A choice refined between grid points has no exact model here.
    if 'exact model' in label and 'exact' not in seed['posthoc']:
      continue
    assert all(map(math.isfinite, row['held_out_loss_per_seed']))
  schedules = results['grid']['schedules']
  assert [s['num_snapshots'] for s in schedules] == [4, 2]
  assert seed['snapshots'] == len(schedules[0]['steps'])
  by_schedule = seed['synthesis']['by_schedule']
  assert [s['num_snapshots'] for s in by_schedule] == [4, 2]
  for schedule, accuracy in zip(schedules, by_schedule):
    assert schedule['steps'] == optax_bema.snapshot_steps(7, schedule[
        'num_snapshots'])
    # choose may return an average outside the grid, better than its best.
    assert _is_candidate(accuracy['choice']['name'], names)
    assert math.isfinite(accuracy['gap_to_hindsight'])
    assert accuracy['cost']['candidates'] > len(names)
    assert set(accuracy['model_error']) == {'ema', 'bema', 'dema', 'ouema'}
    for errors in accuracy['model_error'].values():
      assert math.isfinite(errors['max'])
    # Read off the saved params: exact up to float32 and the fit's ridge.
    assert accuracy['exact_settings_max_model_error'] < 1e-3
  assert 0 <= seed['posthoc']['residual'] < 1
  assert seed['posthoc']['estimated_error'] <= 0.02
  assert _posthoc_report.report(results, 'smoke').count('\n') > 20


def test_exact_settings_are_those_updated_only_at_saved_steps(results):
  # A setting updated every f steps weighs steps 0, f, 2f, ... <= T alone.
  settings = posthoc.grid(**posthoc.GRIDS['smoke'], base=BASE)
  for schedule in results['grid']['schedules']:
    saved = set(schedule['steps'])
    assert set(schedule['exact']) == {
        k for k, s in settings.items()
        if set(range(0, CONFIG['steps'] + 1, s['update_freq'])) <= saved}
  assert results['grid']['schedules'][0]['exact']  # the f=10 settings
  assert len(results['grid']['schedules'][0]['exact']) < len(settings)


def test_read_only_saved():
  profiles = np.array([[0.5, 0, 0.5, 0], [0.2, 0.3, 0.5, 0], [0, 0, 0, 1.0]])
  np.testing.assert_array_equal(posthoc.read_only_saved(profiles, [0, 2]),
                                [True, False, False])
  np.testing.assert_array_equal(
      posthoc.read_only_saved(profiles, [0, 1, 2, 3]), [True, True, True])


def test_profile_sums_are_the_online_models(results):
  defaults = results['per_seed'][0]['defaults']
  assert {d['name'] for d in defaults.values()} == set(
      results['defaults'].values())
  assert all(name.endswith('/f=1') for name in results['defaults'].values())
  for default in defaults.values():  # updated every step: a real check
    assert default['profile_check'] < 1e-4


def test_validation_windows_are_never_trained_on():
  train = np.arange(1000) % 256
  rest, validation = _runs.validation_split(train, 4, 8)
  assert len(rest) == 1000 - 4 * 9
  np.testing.assert_array_equal(validation.ravel(), train[-36:])
  with pytest.raises(ValueError, match='quarter'):
    _runs.validation_split(train, 40, 8)


@pytest.mark.parametrize('steps', [4, 7, 8])  # blocks of 4: full, partial
def test_profile_sums_are_the_matrix_product(steps):
  rng = np.random.default_rng(0)
  profiles, iterates = rng.normal(size=(3, steps)), rng.normal(size=(steps, 5))
  sums = posthoc.ProfileSums(profiles, 5, block=4)
  for theta in iterates:
    sums.add(theta.astype(np.float32))
  np.testing.assert_allclose(sums.models(), profiles @ iterates, atol=1e-5)
