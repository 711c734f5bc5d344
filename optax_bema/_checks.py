"""Hyperparameter validation: a clear ValueError at construction.

Values that ``optax.inject_hyperparams`` turns into traced arrays cannot be
checked inside the step; their construction-time values were.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import numpy as np



def is_static(x) -> bool:
  """A Python or NumPy number, as opposed to an (injected, traced) array."""
  return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, bool)


def check(ok: Callable[[float], bool], value, message: str):
  """Raises ``ValueError(message)`` when a concrete ``value`` fails ``ok``.

  Values that ``optax.inject_hyperparams`` turns into traced arrays cannot be
  checked; their construction-time values were.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if not ok(float(np.asarray(value))):
    raise ValueError(message)


def check_power_law(name, *, power, lag, multiplier, floor=None,
                    power_name='ema_power'):
  """The power-law weight must exist, and be at most 1, at every step t >= 1."""
  check(lambda v: v >= 0, power,
        f'{name}: {power_name} must be >= 0, got {power}.')
  check(lambda v: v >= 0, multiplier,
        f'{name}: multiplier must be >= 0 (the weights are '
        f'(lag + multiplier * t) ** -power), got {multiplier}.')
  if is_static(lag) and is_static(multiplier):
    check(lambda v: v > 0, float(lag) + float(multiplier),
          f'{name}: lag + multiplier must be > 0 so that the weight at step 1, '
          f'(lag + multiplier) ** -{power_name}, is defined; got lag={lag}, '
          f'multiplier={multiplier}.')
  if all(is_static(v) for v in (lag, multiplier, power)):
    first = (float(lag) + float(multiplier)) ** (-float(power))
    check(lambda v: v <= 1.0 + 1e-6, first,
          f'{name}: the weight at step 1, (lag + multiplier) ** -{power_name}'
          f' = {first:.4g}, exceeds 1, so the average would extrapolate '
          'rather than average; raise lag.')
  if floor is not None:
    check(lambda v: 0.0 <= v <= 1.0, floor,
          f'{name}: min_ema_multiplier must lie in [0, 1], got {floor}.')


def check_schedule(name, *, update_after, update_freq):
  check(lambda v: v >= 0, update_after,
        f'{name}: update_after must be >= 0, got {update_after}.')
  check(lambda v: v >= 1, update_freq,
        f'{name}: update_freq must be >= 1, got {update_freq}.')
  for arg, value in (('update_after', update_after),
                     ('update_freq', update_freq)):
    check(lambda v: v == int(v), value,
          f'{name}: {arg} must be an integer, got {value}.')
