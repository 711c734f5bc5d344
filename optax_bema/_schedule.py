"""A stabilizer's schedule: when it updates and with what weights.

One value, built by each stabilizer's factory from its arguments, read by
the engine (in float32, inside the step), by the profiles (in float64, in
NumPy), by replay and by synthesis, and saved with :func:`averages`' state.
Adding a setting or a family of weights is one change, here.

Two families of EMA weight beta_t, at the absolute step t:

* power law (the BEMA paper, Block and Zhang 2025, Algorithm 1):
  beta_t = max((lag + multiplier t) ** -ema_power, min_ema_multiplier);
* power function (EDM2, Karras et al. 2024, Eq. 127): with t' = t -
  update_after the steps since the burn-in and gamma from ``std`` (Eq. 126),
  the retention is (1 - update_freq / t') ** (gamma + 1) and beta_t is one
  minus it, so the profile at any step is proportional to (tau / t) **
  gamma.

and, for BEMA, the bias-correction weight alpha_t = (lag + bias_multiplier t)
** -bias_power; for OUEMA, p_t = (1 + bias_multiplier t) ** -bias_power.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_bema import _checks

SCALAR_DTYPE = jnp.float32
# The largest std a power-function EMA can have: the uniform average's.
MAX_STD = math.sqrt(1 / 12)


def gamma_from_std(std: float) -> float:
  """EDM2's exponent gamma for a relative standard deviation ``std``.

  The profile (tau / t) ** gamma on (0, t] has relative standard deviation
  sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3))) (EDM2, Eq. 123);
  inverting it, gamma is the largest real root of gamma ** 3 + 7 gamma ** 2
  + (16 - std ** -2) gamma + (12 - std ** -2) (Eq. 126).
  """
  s = float(std) ** -2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  return float(roots[np.abs(roots.imag) < 1e-9].real.max())


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """When a stabilizer updates, and its weights.

  Attributes:
    update_after: the burn-in tau; steps t <= tau reset the averages.
    update_freq: an update every ``update_freq`` steps after the burn-in.
    ema_power, lag, multiplier, min_ema_multiplier: the power-law EMA
      weight; ``ema_power`` is None for the power-function family.
    std: the power-function EMA's relative standard deviation (EDM2), or
      None for the power law.
    bias_power, bias_multiplier: the bias weight (BEMA's alpha_t, OUEMA's
      p_t); ``bias_power`` is None where the kind has none.
  """
  update_after: Any = 0
  update_freq: Any = 1
  ema_power: Any = None
  lag: Any = 10.0
  multiplier: Any = 1.0
  min_ema_multiplier: Any = 0.0
  std: Any = None
  bias_power: Any = None
  bias_multiplier: Any = None

  def __post_init__(self):
    if self.bias_power is not None and self.bias_multiplier is None:
      object.__setattr__(self, 'bias_multiplier', self.multiplier)

  # Names of the settings a family uses; the others are left out of
  # ``settings()``, so a saved state records what the average depends on.
  _POWER_LAW = ('ema_power', 'lag', 'multiplier', 'min_ema_multiplier')
  _BIAS = ('bias_power', 'bias_multiplier')

  # Settings counted in steps: integers in a saved record.
  STEPS = ('update_after', 'update_freq')

  @property
  def gamma(self) -> float:
    return gamma_from_std(self.std)

  @property
  def every_step(self) -> bool:
    """Whether it is known when built that every step updates (a step then
    needs no branch, and BEMA no copy of theta)."""
    return _checks.is_static(self.update_freq) and self.update_freq == 1

  def record(self) -> dict:
    """:meth:`settings` as plain Python numbers: ints for the settings
    counted in steps, floats for the others."""
    return {k: int(v) if k in self.STEPS else float(v)
            for k, v in self.settings().items()}

  def settings(self) -> dict:
    """The settings the weights depend on, by name (what a checkpoint
    records)."""
    names = ['update_after', 'update_freq']
    if self.std is not None:
      names.append('std')
    elif self.ema_power is not None:
      names += self._POWER_LAW
    if self.bias_power is not None:
      names += self._BIAS
    return {n: getattr(self, n) for n in names}

  def check(self, transform: str, required=()):
    """Raises ``TypeError`` for a setting that is not a number (those in
    ``required`` and those :meth:`settings` names) and ``ValueError`` for
    settings that give no average."""
    for name in dict.fromkeys((*required, *self.settings())):
      _checks.require_number(transform, name, getattr(self, name))
    _checks.check_schedule(transform, update_after=self.update_after,
                           update_freq=self.update_freq)
    if self.std is not None:
      if not _checks.is_static(self.std):
        raise TypeError(
            f'{transform}: std must be a number: it fixes the exponent gamma '
            f'when the transform is built (got {type(self.std).__name__}).')
      _checks.check(transform, 'std', self.std, lambda v: 0 < v < MAX_STD,
                    f'lie in (0, sqrt(1/12) = {MAX_STD:.4f}): the relative '
                    'standard deviation of a power-function profile')
    elif self.ema_power is not None:
      _checks.check_power_law(
          transform, power=self.ema_power, lag=self.lag,
          multiplier=self.multiplier, floor=self.min_ema_multiplier)
    if self.bias_power is not None:
      _checks.check(transform, 'bias_multiplier', self.bias_multiplier,
                    *_checks.NONNEGATIVE)
      _checks.check(transform, 'bias_power', self.bias_power,
                    *_checks.NONNEGATIVE, allow_inf=True)  # inf: no bias

  # The weights, in NumPy (float64) or, with ``xp=jnp``, in float32 inside
  # a step: scalars are cast before they meet t, the product never is.
  def beta(self, t, xp=np):
    """The EMA weight of an update at absolute step ``t``."""
    c = _caster(xp)
    if self.std is not None:
      since = t - c(self.update_after)
      with np.errstate(divide='ignore'):  # log(0) at the first update: r = 0
        retention_log = (c(self.gamma) + 1) * xp.log1p(
            -c(self.update_freq) / since)
      return -xp.expm1(retention_log)
    if self.ema_power is None:  # no EMA (theta_0's holder): never read
      return c(0.0) * t
    weight = (c(self.lag) + c(self.multiplier) * t) ** (-c(self.ema_power))
    return xp.maximum(weight, c(self.min_ema_multiplier))

  def alpha(self, t, xp=np):
    """BEMA's bias-correction weight at step ``t`` (0 without one)."""
    c = _caster(xp)
    if self.bias_power is None:
      return c(0.0) * t
    return (c(self.lag) + c(self.bias_multiplier) * t) ** (
        -c(self.bias_power))

  def ou_weight(self, t, xp=np):
    """OUEMA's p_t = (1 + bias_multiplier t) ** -bias_power."""
    c = _caster(xp)
    return (1 + c(self.bias_multiplier) * t) ** (-c(self.bias_power))

  def is_update_step(self, t):
    """Whether step ``t`` (an int32 array) updates the averages."""
    since = t - jnp.asarray(self.update_after, t.dtype)
    return (since > 0) & (since % jnp.asarray(self.update_freq, t.dtype) == 0)

  def update_steps(self, num_steps: int) -> np.ndarray:
    """The update steps up to ``num_steps``, increasing, int64."""
    first = int(self.update_after) + int(self.update_freq)
    return np.arange(first, num_steps + 1, int(self.update_freq),
                     dtype=np.int64)

  def anchor(self, num_steps: int) -> int:
    """The step whose iterate plays theta_0 after ``num_steps`` steps: the
    last burn-in step (0, the weights at init, without a burn-in)."""
    return min(int(self.update_after), num_steps)

  def read_steps(self, num_steps: int) -> np.ndarray:
    """The steps whose iterates the model after ``num_steps`` depends on."""
    return np.concatenate([[self.anchor(num_steps)],
                           self.update_steps(num_steps)]).astype(np.int64)

  def next_read_step(self, after: int) -> int:
    """The first step after ``after`` whose iterate the model reads."""
    tau, freq = int(self.update_after), int(self.update_freq)
    if after < tau:
      return tau
    first = after + 1
    return first + (-(first - tau)) % freq


def _caster(xp):
  if xp is np:
    return lambda v: np.float64(v)
  return lambda v: jnp.asarray(v, SCALAR_DTYPE)


def from_settings(settings: dict) -> Schedule:
  """The schedule a checkpoint recorded (see :meth:`Schedule.settings`)."""
  return Schedule(**settings)
