"""Targets: what a post-hoc model should be, as weights on the iterates.

Every stabilizer's model after step T is a fixed linear combination of the
iterates theta_0..theta_T, its *profile* (:func:`profile`); any such
combination, given as weights (:func:`uniform_profile`, a merge,
:func:`decay_profile`), is a target too. Replay and synthesis take either.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Union

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


# Decay shapes w(u) on the window's progress u in [0, 1]: w(0) = 1, w(1) = 0.
# 1-sqrt is Hagele et al. 2024's cooldown ("Scaling Laws and Compute-Optimal
# Training Beyond Fixed Training Durations"), the one levanter and WSM use.
DECAYS: dict[str, Callable[[float], float]] = {
    'linear': lambda u: 1.0 - u,
    'cosine': lambda u: (1.0 + math.cos(math.pi * u)) / 2.0,
    '1-sqrt': lambda u: 1.0 - math.sqrt(u),
}


def decay_profile(steps, num_steps: int,
                  decay: Union[str, Callable[[float], float]] = 'linear'
                  ) -> np.ndarray:
  """Merge weights on saved checkpoints that act as a learning-rate decay.

  Merging a constant-rate run's checkpoints in place of decaying its rate
  (WSM, Tian et al. 2025; PMA, Li et al. 2025): with a constant rate lr and
  u_t the optimizer's update at step t (theta_{t+1} = theta_t - lr u_t), the
  checkpoints at the saved steps s_0 < s_1 < ... < s_k = T are
  theta_{s_i} = theta_{s_0} - lr sum_{s_0 <= t < s_i} u_t, so a merge with
  weights c_i summing to 1 is::

    sum_i c_i theta_{s_i} = theta_{s_0} - lr sum_{s_0 <= t < T} m_t u_t,
    m_t = sum_{i: s_i > t} c_i,

  the run whose rate is multiplied by m_t, with the same updates u_t. The
  weights make m_t follow the shape w over the window [s_0, T]: with
  u_i = (s_i - s_0) / (T - s_0),

    c_0 = 0 and c_i = w(u_{i-1}) - w(u_i) for i = 1..k,

  so for t in [s_{i-1}, s_i) the multiplier is m_t = w(u_{i-1}), the shape
  at the start of the save interval t falls in: held between saves, exact
  at every step when every step is saved. The weights sum to w(0) - w(1)
  = 1; s_0 is the window's anchor and carries no weight. ``'linear'``
  weighs each checkpoint by its interval, so checkpoints saved every N
  steps get equal weights: the plain mean of s_1..s_k (PMA's merge) is a
  linear decay over [s_1 - N, T].

  The equivalence is exact when the updates do not depend on the params
  and first order in lr otherwise: a decayed run computes its updates at
  other params. For SGD on a quadratic with curvature h the merge's mean
  contracts by sum_i c_i (1 - lr h)^(s_i - s_0) and the decayed run's by
  prod_t (1 - lr m_t h), equal to first order in lr h, and the merge
  averages the noise where the decayed run damps it; for Adam the updates
  are also normalised by the path's own moments, so the merge is close to
  the decayed run only as far as the papers measure it.

  Args:
    steps: the saved steps s_0..s_k, distinct, at least two (any order);
      the smallest starts the window, the largest must be ``num_steps``.
    num_steps: T, the last step and the last saved step: the window ends
      where the merge is taken (updates after the last checkpoint are not
      in any checkpoint, so a merge cannot decay them).
    decay: ``'linear'``, ``'cosine'`` ((1 + cos(pi u)) / 2), ``'1-sqrt'``
      (1 - sqrt(u)), or a callable w(u) on [0, 1] with w(0) = 1 and
      w(1) = 0. A nonincreasing w gives nonnegative weights.

  Returns:
    A float64 array of ``num_steps + 1`` weights summing to 1, nonzero
    only on ``steps``: a target for :func:`replay` (exact when every step
    it weighs was saved) and :func:`synthesize`.

  Raises:
    ValueError: repeated steps, fewer than two, the last not
      ``num_steps``, an unknown decay name, or a callable whose w(0) is
      not 1, w(1) not 0, or any value not finite.
    TypeError: a step that is not an integer.

  Examples:
    >>> import optax_bema
    >>> optax_bema.decay_profile([8, 9, 10], 10, 'linear').tolist()[8:]
    [0.0, 0.5, 0.5]
    >>> w = optax_bema.decay_profile(range(0, 101, 25), 100, '1-sqrt')
    >>> [round(float(x), 3) for x in w[25::25]]
    [0.5, 0.207, 0.159, 0.134]
  """
  caller = 'decay_profile'
  num_steps = _checks.whole_step(num_steps, caller, 'num_steps')
  steps = sorted(_checks.whole_step(s, caller) for s in steps)
  if len(steps) < 2 or len(set(steps)) != len(steps) or steps[-1] != num_steps:
    raise ValueError(
        f'{caller}: steps must be distinct, at least two (the window\'s '
        f'start and its end), and the last must be num_steps={num_steps}, '
        f'the step the merge is taken at; got {steps}.')
  shape = _decay_shape(decay, caller)
  s = np.array(steps, np.float64)
  tail = [shape(u) for u in (s - s[0]) / (s[-1] - s[0])]
  tail[0], tail[-1] = 1.0, 0.0
  w = np.zeros(num_steps + 1)
  w[steps[1:]] = -np.diff(tail)
  return w


def _decay_shape(decay, caller: str) -> Callable[[float], float]:
  """``decay`` as a checked w(u)."""
  if isinstance(decay, str):
    if decay not in DECAYS:
      raise ValueError(f'{caller}: unknown decay {decay!r}; one of '
                       f'{", ".join(map(repr, DECAYS))}, or a callable w(u).')
    return DECAYS[decay]
  if not callable(decay):
    raise TypeError(f'{caller}: decay must be a name or a callable w(u), got '
                    f'{decay!r} ({type(decay).__name__}).')

  def shape(u: float) -> float:
    value = float(decay(u))
    if not math.isfinite(value):
      raise ValueError(f'{caller}: decay({u}) = {value}; it must be finite.')
    return value
  for u, expected in ((0.0, 1.0), (1.0, 0.0)):
    if not math.isclose(shape(u), expected, abs_tol=1e-9):
      raise ValueError(f'{caller}: a decay w(u) must have w(0) = 1 and '
                       f'w(1) = 0; got w({u:g}) = {shape(u)}.')
  return shape


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
