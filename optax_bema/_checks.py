"""Hyperparameter validation: one helper, a clear ValueError at construction.

Values that ``optax.inject_hyperparams`` turns into traced arrays cannot be
checked inside the step; their construction-time values were. Schedules
(callables) are checked by the optimizer that calls them, not here.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Conditions met by most hyperparameters: (ok, what it demands in words).
NONNEGATIVE = (lambda v: v >= 0, 'be >= 0')
DECAY = (lambda v: 0 <= v < 1, 'lie in [0, 1)')


def is_static(x) -> bool:
  """A Python or NumPy number, as opposed to an (injected, traced) array."""
  return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, bool)


def require_number(transform: str, name: str, value):
  """``TypeError`` unless ``value`` is a real number or a scalar array.

  A stabilizer's weights are fixed by its settings when it is built: a
  schedule (a callable) or a string would otherwise pass construction and
  fail at the first update. Scalar arrays are what
  ``optax.inject_hyperparams`` passes.
  """
  if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0 and (
      jnp.issubdtype(value.dtype, jnp.integer)
      or jnp.issubdtype(value.dtype, jnp.floating)):
    return
  if is_static(value) and isinstance(value, numbers.Real):
    return
  hint = (' To change a setting during training, wrap the factory in '
          'optax.inject_hyperparams, which calls the schedule.'
          if callable(value) else '')
  raise TypeError(f'{transform}: {name} must be a number, got {value!r} '
                  f'({type(value).__name__}).{hint}')


def check(transform: str, name: str, value, ok: Callable[[float], bool],
          must: str, *, allow_inf: bool = False):
  """Raises ``ValueError`` unless ``value`` is a number for which ``ok`` holds.

  NaN is always refused, and so is an infinity unless ``allow_inf``: a
  comparison such as ``v >= 0`` would let ``inf`` through, and an infinite
  weight or rate turns every average into NaN at the first update.

  Args:
    transform: the public name, which starts the message.
    name: the argument's name.
    value: its value; traced values and schedules are skipped.
    ok: the condition on the value, as a float.
    must: what ``ok`` demands, in words, e.g. ``'be >= 0'``.
    allow_inf: whether an infinity that satisfies ``ok`` is meaningful.
  """
  if isinstance(value, jax.core.Tracer) or callable(value):
    return
  v = float(np.asarray(value))
  if math.isnan(v) or (math.isinf(v) and not allow_inf):
    raise ValueError(f'{transform}: {name} must be a finite number and '
                     f'{must}, got {value}.')
  if not ok(v):
    raise ValueError(f'{transform}: {name} must {must}, got {value}.')


def check_power_law(transform, *, power, lag, multiplier, floor=None,
                    power_name='ema_power'):
  """The weight (lag + multiplier t) ** -power exists and is at most 1 at
  every step t >= 1, so that it averages rather than extrapolates."""
  check(transform, power_name, power, *NONNEGATIVE)
  check(transform, 'multiplier', multiplier, lambda v: v >= 0,
        'be >= 0 (the weights are (lag + multiplier * t) ** -power)')
  check(transform, 'lag', lag, lambda v: True, 'be finite')
  if is_static(lag) and is_static(multiplier):
    check(transform, 'lag + multiplier', float(lag) + float(multiplier),
          lambda v: v > 0, f'be > 0 so that the weight at step 1, '
          f'(lag + multiplier) ** -{power_name}, is defined')
  if all(is_static(v) for v in (lag, multiplier, power)):
    first = (float(lag) + float(multiplier)) ** (-float(power))
    check(transform, f'the weight at step 1, (lag + multiplier) ** '
          f'-{power_name},', first, lambda v: v <= 1.0 + 1e-6,
          'be at most 1, or the average would extrapolate rather than '
          'average; raise lag')
  if floor is not None:
    check(transform, 'min_ema_multiplier', floor, lambda v: 0.0 <= v <= 1.0,
          'lie in [0, 1]')


def check_schedule(transform, *, update_after, update_freq):
  """Burn-in and update frequency are whole numbers of steps."""
  check(transform, 'update_after', update_after,
        lambda v: v >= 0 and v == int(v), 'be an integer >= 0')
  check(transform, 'update_freq', update_freq,
        lambda v: v >= 1 and v == int(v), 'be an integer >= 1')


def whole_step(value, caller: str, what: str = 'a step') -> int:
  """``value`` as an int >= 0: ``TypeError`` if it is not an integer (a
  Python, NumPy or 0-d JAX integer; 10.0 is a float), ``ValueError`` if
  negative."""
  if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f'{caller}: {what} must be an integer, got {value!r} '
                    f'({type(value).__name__}).')
  if value < 0:
    raise ValueError(f'{caller}: {what} must be >= 0, got {value}.')
  return int(value)


def float32_weight(schedule, weight):
  """``weight(t, float32)`` at the schedule's first update step, computed in
  float32 as the step computes it; None where a setting is not a number
  (an injected one, checked when it was built)."""
  names = ('update_after', 'update_freq', *schedule.settings())
  if not all(is_static(getattr(schedule, n)) for n in names):
    return None
  t = np.float32(int(schedule.update_after) + int(schedule.update_freq))
  with np.errstate(all='ignore'):
    return float(weight(t, np.float32))
