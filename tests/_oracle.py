"""The reference every test of an average asks: plain loops, in float64.

Written from the papers, one iterate at a time; it never forms a profile and
never calls the library. Step t counts optimizer steps from 1; theta_t are
the weights after step t and theta_0 those at init. Every kind shares one
schedule:

- burn-in: for t <= update_after, theta_0, every average and the returned
  model are reset to theta_t;
- after it, t is an update step when t - update_after is a multiple of
  update_freq; between update steps nothing changes, and the returned model
  is the one from the last update step.

A kind says what one update step does: the new value of each average it
keeps (each theta_0 at init) and the model it returns. Adding a kind is one
entry in ``KINDS``.

The stabilizers of Block and Zhang, "EMA Without the Lag: Bias-Corrected
Iterate Averaging Schemes" (2025, arXiv 2508.00180, Algorithm 1 and
Appendix C), with their Table 2 defaults, on update step t:

  beta_t = max((lag + multiplier t)^-ema_power, min_ema_multiplier)
  alpha_t = (lag + bias_multiplier t)^-bias_power      (no floor)
  p_t = (1 + bias_multiplier t)^-bias_power
  ema:   e <- (1 - beta_t) e + beta_t theta_t;            model e
  bema:  the same e;                     model alpha_t (theta_t - theta_0) + e
  dema:  e1 as ema, e2 <- (1 - beta_t) e2 + beta_t e1 (the new e1);
                                                          model 2 e1 - e2
  ouema: e <- (1 - beta_t) e + beta_t (theta_t - p_t theta_0) / (1 - p_t);
                                                          model e

bias_multiplier is multiplier unless given. The power-function EMA of
Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (EDM2, 2024, Section 3 and Appendix C), counts t' = t -
update_after steps from the burn-in:

  power_ema: e <- r e + (1 - r) theta_t, r = (1 - update_freq / t')^(gamma + 1),

gamma from its relative standard deviation ``std`` (:func:`power_exponent`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np


class Kind(NamedTuple):
  """One averaging kind: its settings and what an update step does.

  ``update(t, theta, theta0, averages, settings)`` returns the averages after
  update step t; ``model`` takes the same arguments with the new averages and
  returns the model the kind returns.
  """
  settings: dict  # every setting and its default; None: it must be given
  averages: tuple[str, ...]
  update: Callable[..., dict]
  model: Callable[..., np.ndarray]


# Table 2 of the BEMA paper; bias_multiplier None is multiplier.
STABILIZER_SETTINGS = dict(
    ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, update_after=0,
    update_freq=400, min_ema_multiplier=0.0, bias_multiplier=None)


def beta(t: int, s: dict) -> float:
  """The EMA weight of update step t."""
  return max((s['lag'] + s['multiplier'] * t) ** -s['ema_power'],
             s['min_ema_multiplier'])


def _bias_multiplier(s: dict) -> float:
  if s['bias_multiplier'] is None:
    return s['multiplier']
  return s['bias_multiplier']


def alpha(t: int, s: dict) -> float:
  """BEMA's bias-correction weight of update step t."""
  return (s['lag'] + _bias_multiplier(s) * t) ** -s['bias_power']


def ou_p(t: int, s: dict) -> float:
  """OUEMA's p_t, the weight theta_0 keeps in the OU process at step t."""
  return (1.0 + _bias_multiplier(s) * t) ** -s['bias_power']


def _ema(average, x, weight):
  return (1 - weight) * average + weight * x


def _ema_update(t, theta, theta0, a, s):
  del theta0
  return dict(e=_ema(a['e'], theta, beta(t, s)))


def _dema_update(t, theta, theta0, a, s):
  del theta0
  e1 = _ema(a['e1'], theta, beta(t, s))
  return dict(e1=e1, e2=_ema(a['e2'], e1, beta(t, s)))


def _ouema_update(t, theta, theta0, a, s):
  p = ou_p(t, s)
  return dict(e=_ema(a['e'], (theta - p * theta0) / (1 - p), beta(t, s)))


def power_std(gamma: float) -> float:
  """EDM2's Eq. 123: the relative std of the profile (tau / t) ** gamma."""
  return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_exponent(std: float) -> float:
  """EDM2's gamma for a relative standard deviation ``std`` in (0,
  sqrt(1/12)): Eq. 123 inverted by bisection (it decreases in gamma on
  gamma > -1), not through Eq. 126's cubic."""
  low, high = -1 + 1e-12, 1e7
  for _ in range(200):
    mid = (low + high) / 2
    low, high = (mid, high) if power_std(mid) > std else (low, mid)
  return (low + high) / 2


def _power_ema_update(t, theta, theta0, a, s):
  del theta0
  since = t - s['update_after']
  r = (1.0 - s['update_freq'] / since) ** (power_exponent(s['std']) + 1.0)
  return dict(e=r * a['e'] + (1.0 - r) * theta)


KINDS = {
    'ema': Kind(STABILIZER_SETTINGS, ('e',), _ema_update,
                lambda t, theta, theta0, a, s: a['e']),
    'bema': Kind(STABILIZER_SETTINGS, ('e',), _ema_update,
                 lambda t, theta, theta0, a, s:
                 alpha(t, s) * (theta - theta0) + a['e']),
    'dema': Kind(STABILIZER_SETTINGS, ('e1', 'e2'), _dema_update,
                 lambda t, theta, theta0, a, s: 2 * a['e1'] - a['e2']),
    'ouema': Kind(STABILIZER_SETTINGS, ('e',), _ouema_update,
                  lambda t, theta, theta0, a, s: a['e']),
    # std: EDM2's wider tracked width where a test gives none.
    'power_ema': Kind(dict(std=0.1, update_after=0, update_freq=1), ('e',),
                      _power_ema_update,
                      lambda t, theta, theta0, a, s: a['e']),
}


# Every setting some kind reads. A kind ignores the others, so one sweep's
# settings serve every kind; a misspelt one is still an error.
_ANY_KIND = set().union(*(k.settings for k in KINDS.values()))


def settings_of(kind: str, settings: dict) -> dict:
  """The kind's settings with defaults filled in; a setting no kind reads is
  an error, not silently its default."""
  defaults = KINDS[kind].settings
  settings = {k: v for k, v in settings.items()
              if k in defaults or k not in _ANY_KIND}
  unknown = set(settings) - set(defaults)
  if unknown:
    raise TypeError(f'{kind} has no settings {sorted(unknown)}')
  s = {**defaults, **settings}
  missing = [k for k, v in s.items() if v is None and k != 'bias_multiplier']
  if missing:
    raise TypeError(f'{kind} needs {missing}')
  return s


def models(kind: str, theta0, iterates: Sequence,
           steps: Optional[Sequence[int]] = None,
           **settings) -> list[np.ndarray]:
  """The model the kind returns after each iterate, in float64.

  Args:
    kind: a key of ``KINDS``.
    theta0: the weights at init, an array.
    iterates: ``iterates[k]`` is theta after step ``steps[k]``.
    steps: increasing absolute steps; 1, 2, ... by default. A step with no
      iterate changes nothing (a step the library skipped).
    **settings: the kind's settings; missing ones take their defaults.

  Returns:
    One float64 array per iterate.
  """
  k, s = KINDS[kind], settings_of(kind, settings)
  theta0 = np.asarray(theta0, np.float64)
  averages = dict.fromkeys(k.averages, theta0)
  model = theta0
  out = []
  steps = range(1, len(iterates) + 1) if steps is None else steps
  for t, theta in zip(steps, iterates):
    theta = np.asarray(theta, np.float64)
    if t <= s['update_after']:
      theta0 = model = theta
      averages = dict.fromkeys(k.averages, theta)
    elif (t - s['update_after']) % s['update_freq'] == 0:
      averages = k.update(t, theta, theta0, averages, s)
      model = k.model(t, theta, theta0, averages, s)
    out.append(model)
  return out


def trajectory_models(kind: str, thetas: np.ndarray, **settings) -> np.ndarray:
  """The model after each step 0..T, rows of ``thetas`` being theta_0..T."""
  return np.stack([np.asarray(thetas[0], np.float64)]
                  + models(kind, thetas[0], thetas[1:], **settings))


def model_tree(kind: str, theta0, iterates: Sequence,
               steps: Optional[Sequence[int]] = None, **settings):
  """The model after the last iterate, leaf by leaf, for pytrees."""
  return jax.tree.map(
      lambda x0, *xs: models(kind, x0, xs, steps, **settings)[-1],
      theta0, *iterates)


def constrained_lstsq(matrix, rhs, sums, total):
  """argmin ||matrix @ x - rhs|| subject to sums @ x = total, from the
  Lagrange (KKT) system solved by NumPy, independently of the library."""
  n = matrix.shape[1]
  kkt = np.block([[2 * matrix.T @ matrix, sums[:, None]],
                  [sums[None, :], np.zeros((1, 1))]])
  solution = np.linalg.lstsq(
      kkt, np.concatenate([2 * matrix.T @ rhs, [total]]), rcond=None)[0]
  return solution[:n]
