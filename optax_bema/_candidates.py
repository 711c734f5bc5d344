"""The candidates :func:`~optax_bema.choose` scores by default: every family
the library reconstructs, each at several lengths (:func:`default_candidates`),
and how each family's length is refined between grid points.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from optax_bema import _engine
from optax_bema import _stabilizers
from optax_bema import _targets


class Family(NamedTuple):
  build: Callable   # (setting, num_steps) -> target
  grid: Callable    # num_steps -> settings
  geometric: bool   # refine between settings in log scale
  limits: Callable  # num_steps -> (lowest, highest) setting refined to


def _power_law(factory, **settings):
  return Family(
      lambda p, _: factory(ema_power=float(p), update_freq=1, **settings),
      lambda _: (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), False,
      lambda _: (0.1, 0.99))


def _window(fractions):
  def grid(num_steps):
    windows = (round(f * num_steps) for f in fractions)
    return tuple(sorted({w for w in windows if 2 <= w <= num_steps}))
  return grid


FAMILIES = {
    'ema': _power_law(_stabilizers.ema),
    'bema': _power_law(_stabilizers.bema, bias_power=0.2),
    'dema': _power_law(_stabilizers.dema),
    'ouema': _power_law(_stabilizers.ouema, bias_power=0.2),
    'power_ema': Family(lambda s, _: _stabilizers.power_ema(float(s)),
                         lambda _: (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25),
                         True, lambda _: (0.003, 0.28)),
    # The mean of the last W iterates: LAWA's and PMA's checkpoint means
    # as checkpoints grow dense, and SWA's tail average.
    'mean': Family(lambda w, t: _targets.uniform_profile(
        range(t - int(w) + 1, t + 1), t),
                    _window((0.01, 0.03, 0.1, 0.3, 1.0)), True,
                    lambda t: (2, t)),
    # Checkpoint merges shaped as a learning-rate decay over the last W
    # steps (WSM, arXiv 2507.17634), every iterate of the window weighed.
    **{shape: Family(lambda w, t, shape=shape: _targets.decay_profile(
        range(t - int(w), t + 1), t, shape),
                      _window((0.03, 0.1, 0.3, 1.0)), True,
                      lambda t: (2, t))
       for shape in ('cosine', '1-sqrt')},
}


# The families whose setting is a window in steps.
WINDOWS = ('mean', 'cosine', '1-sqrt')


def name(family, setting) -> str:
  return f'{family} {setting:g}'


def default_candidates(num_steps: int) -> dict:
  """``{name: (target, family, setting)}``: :func:`choose`'s default grid
  for a run whose last snapshot is at step ``num_steps``."""
  return {name(f, s): (fam.build(s, num_steps), f, s)
          for f, fam in FAMILIES.items() for s in fam.grid(num_steps)}


def never_updated(target, num_steps: int) -> bool:
  """Whether ``target`` is a stabilizer with no update step after its
  burn-in by ``num_steps``: its model is then no average (the weights it
  started from, or, still in its burn-in, the last iterate)."""
  return (isinstance(target, _engine.Stabilizer)
          and not target.schedule.update_steps(num_steps).size)
