"""Targets: what a post-hoc model should be, as weights on the iterates.

Every stabilizer's model after step T is a fixed linear combination of the
iterates theta_0..theta_T, its *profile* (:func:`profile`); any such
combination, given as weights (:func:`uniform_profile`, a merge), is a
target too. Replay and synthesis take either.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import optax

from optax_bema import _checks
from optax_bema import _engine
from optax_bema import _kinds
from optax_bema import _profiles


def profile(stabilizer: _engine.Stabilizer, num_steps: int) -> np.ndarray:
  """The weights of a stabilizer's model on the iterates theta_0..theta_T.

  After step T = ``num_steps`` the model a stabilizer returns is
  ``sum_s w[s] theta_s`` exactly, whatever the trajectory: EMA's weights
  decay into the past (its lag), BEMA adds alpha_T on theta_T and takes it
  from theta_0, DEMA's are partly negative on old iterates, a
  power-function EMA's are proportional to (s / T) ** gamma.

  Args:
    stabilizer: ``optax_bema.ema(...)``, ``bema``, ``dema``, ``ouema`` or
      ``power_ema``.
    num_steps: T, an integer >= 0.

  Returns:
    A float64 array of ``num_steps + 1`` weights; they sum to 1.

  Examples:
    >>> import optax_bema
    >>> w = optax_bema.profile(optax_bema.bema(update_freq=1), 100)
    >>> w.shape, round(float(w.sum()), 6), bool(w[0] < 0)
    ((101,), 1.0, True)
  """
  _kinds.require_stabilizer(stabilizer, 'profile', 'stabilizer')
  num_steps = _checks.whole_step(num_steps, 'profile', 'num_steps')
  return _profiles.dense(stabilizer.rule.profile(
      stabilizer.schedule, np.array([num_steps])))


def uniform_profile(steps, num_steps: int) -> np.ndarray:
  """Equal weights on the iterates at ``steps``: a profile for any target.

  Checkpoint averaging as LLM pretraining does it is one: the mean of the
  last k saved checkpoints (LAWA, Kaddour 2022; ByteDance's PMA, Li et al.
  2025), ``uniform_profile(saved_steps[-k:], T)``; so is SWA's mean of every
  iterate from step s on (Izmailov et al. 2018),
  ``uniform_profile(range(s, T + 1), T)``. Pass the result to
  :func:`replay` (exact when every step it weighs was saved) or
  :func:`synthesize`.

  Args:
    steps: the steps to average, each in [0, num_steps], distinct.
    num_steps: T, the last step.

  Returns:
    A float64 array of ``num_steps + 1`` weights summing to 1.

  Examples:
    >>> import optax_bema
    >>> optax_bema.uniform_profile([2, 4], 4).tolist()
    [0.0, 0.0, 0.5, 0.0, 0.5]
  """
  num_steps = _checks.whole_step(num_steps, 'uniform_profile', 'num_steps')
  steps = [_checks.whole_step(s, 'uniform_profile') for s in steps]
  if not steps or len(set(steps)) != len(steps) or max(steps) > num_steps:
    raise ValueError(f'uniform_profile: steps must be distinct, at least one, '
                     f'and at most num_steps={num_steps}; got {steps}.')
  w = np.zeros(num_steps + 1)
  w[steps] = 1.0 / len(steps)
  return w


def check_profile(weights, num_steps: int, caller: str) -> np.ndarray:
  """A target given as a profile: finite float weights on 0..num_steps
  that sum to 1, as every average's do (a model, not a multiple of one)."""
  w = np.asarray(weights)
  if w.ndim != 1 or not np.issubdtype(w.dtype, np.number):
    raise TypeError(f'{caller}: a profile target must be a 1-d array of '
                    f'weights, got shape {w.shape}, dtype {w.dtype}.')
  if w.shape[0] != num_steps + 1:
    raise ValueError(
        f'{caller}: a profile target needs one weight per step 0..T, T = '
        f'{num_steps} the last snapshot\'s step: {num_steps + 1} weights, '
        f'got {w.shape[0]}.')
  if not np.isfinite(w).all() or not np.any(w):
    raise ValueError(f'{caller}: a profile target must be finite and not '
                     'all zero.')
  total = float(np.sum(w, dtype=np.float64))
  if abs(total - 1.0) > 1e-6:
    raise ValueError(
        f'{caller}: a profile target\'s weights must sum to 1, got {total:.6g}:'
        f' the model would be {total:.6g} times an average. Divide the '
        'weights by their sum.')
  return w.astype(np.float64)


def as_targets(targets, caller: str):
  """``(single, {name: target})``; a target is a stabilizer or a profile."""
  single = not isinstance(targets, Mapping)
  targets = {None: targets} if single else dict(targets)
  if not targets:
    raise ValueError(f'{caller}: no targets; pass a stabilizer, a profile, '
                     'or a dict of them.')
  for name, t in targets.items():
    if isinstance(t, (list, tuple)) and not isinstance(
        t, optax.GradientTransformation) and not all(
        isinstance(x, (int, float, np.number)) for x in t):
      raise TypeError(
          f'{caller}: {"the target" if single else repr(name)} is a '
          f'{type(t).__name__} of {type(t[0]).__name__ if t else "nothing"}; '
          'a profile is a list of numbers. For several targets pass a dict, '
          'e.g. {"ema": optax_bema.ema(), "bema": optax_bema.bema()}.')
    if (isinstance(t, optax.GradientTransformation)
        or not isinstance(t, (np.ndarray, list, tuple))):
      _kinds.require_stabilizer(
          t, caller, 'a target' if single else f'{name!r}')
  return single, targets


def columns(target, ends) -> _profiles.Columns:
  """A target's profile at T, as one column."""
  if isinstance(target, _engine.Stabilizer):
    return _profiles.select(target.rule.profile(target.schedule, ends),
                            [len(ends) - 1])
  w = check_profile(target, int(ends[-1]), 'synthesize')
  empty = np.zeros(0, np.int64)
  return _profiles.Columns(ends, w[None], np.ones((1, len(ends), 1)),
                           (empty, empty, np.zeros(0)))
