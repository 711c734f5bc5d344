"""What to track for choosing after training (:func:`posthoc_ema`) and when
to save it (:func:`snapshot_steps`).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _averages
from optax_bema import _checks
from optax_bema import _stabilizers

# Chosen, with snapshot_steps' placement, by the rule of
# benchmarks/synthetic/posthoc_long_runs.py.
DEFAULT_POSTHOC_POWERS = (0.25, 0.5, 0.75, 0.95)
DEFAULT_POSTHOC_STDS: tuple[float, ...] = ()


def posthoc_ema(ema_powers=DEFAULT_POSTHOC_POWERS,
                stds=DEFAULT_POSTHOC_STDS, *, lag: float = 10.0,
                multiplier: float = 1.0, update_after: int = 0,
                accumulator_dtype: Optional[jnp.dtype] = None,
                offload_to_host: bool = False,
                ) -> optax.GradientTransformationExtraArgs:
  r"""Tracks a few averages of different widths, to choose any average later.

  One power-law EMA per power in ``ema_powers`` (:math:`\beta_t = (\rho +
  \gamma t)^{-\kappa}`), one power-function EMA (:func:`power_ema`) per
  relative width in ``stds``, all updated every step, and theta_0. Save
  this transform's state and the params (not Adam's moments) at the steps
  :func:`snapshot_steps` names; after training, :func:`synthesize` returns
  the model any stabilizer (EMA, BEMA, DEMA, OUEMA, power-function EMA, any
  settings) or any linear average of the iterates would have returned, as
  in the post-hoc EMA of EDM2. Cost: one parameter-sized copy per tracked
  average, plus one for theta_0: five with the defaults.

  The defaults, four power-law EMAs of powers 0.25, 0.5, 0.75 and 0.95,
  were chosen with :func:`snapshot_steps`' placement as the tracked set
  (of up to four power-law and power-function EMAs) with the smallest
  worst-case error over runs of 1e3 to 2e5 steps with 40 snapshots, SGD on
  a noisy quadratic. There, with ``snapshot_steps(T, 40)``, the final model
  of EMA, BEMA (bias_power 0.2 to 0.4), DEMA and OUEMA at any ema_power
  from 0.3 to 0.9 (lag 10, updated every step; at 0.5 also every 10 to 400
  steps) and of power-function EMAs of std 0.01 to 0.28 is synthesized
  within 2% of its distance from theta_T, for T from 1e3 to 1e6, with
  :func:`synthesize`'s default ``ridge=1e-4``: a long average accumulated
  in float32 drifts by about 6e-8 sqrt(t) of its size, which larger
  coefficients would amplify (4% error on EMA 0.4 at 2e5 steps with
  ``ridge=1e-6``). Snapshots stored in bfloat16 (use
  ``ridge=1e-3``) add their rounding, amplified by the coefficients: long
  averages (ema_power 0.7 to 0.9 except DEMA, std 0.02 to 0.28) stay
  within 2%, short untracked ones (ema_power 0.3 to 0.6) are off by 10% to
  100%; store snapshots in float32. Averages tracked in bfloat16
  (``accumulator_dtype``) read well on their own but synthesize worse:
  rounded stochastically at every step, a long one walks by about
  sqrt(t / 6) units in the last place of its lag, which the fit amplifies
  (worst 12%, 21%, 42% at 2e3, 2e4, 2e5 steps with ``ridge=0.1``, the best
  measured); track in float32, offloaded if memory is short.

  Args:
    ema_powers: kappa of each tracked power-law EMA.
    stds: sigma_rel of each tracked power-function EMA.
    lag: rho, the offset of every power-law EMA weight's base.
    multiplier: gamma, the step's factor in that base.
    update_after: the burn-in, as for every stabilizer.
    accumulator_dtype: dtype of the averages (float32 for low-precision
      weights by default). 16-bit averages round stochastically and are
      stored as deviations from the params: lost if those go non-finite.
    offload_to_host: keep the averages in host memory between steps.

  Returns:
    :func:`averages` of the EMAs (named ``'ema_power=<kappa>'`` and
    ``'std=<std>'``) and of theta_0 (named ``'initial'``).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema(
    ...     ema_powers=(0.5,), stds=(0.05, 0.1)))
    >>> state = tx.init(jnp.ones(3))
    >>> sorted(optax.tree.get(state, 'members'))
    ['ema_power=0.5', 'initial', 'std=0.05', 'std=0.1']

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    Section 3 and the appendix on post-hoc EMA).
  """
  shared: dict = dict(accumulator_dtype=accumulator_dtype,
                      offload_to_host=offload_to_host,
                      update_after=update_after)
  ema_powers, stds = tuple(ema_powers), tuple(stds)
  members = {f'ema_power={float(p):g}': _stabilizers.ema(
      ema_power=p, lag=lag, multiplier=multiplier, update_freq=1, **shared)
             for p in ema_powers}
  members.update({f'std={float(s):g}': _stabilizers.power_ema(s, **shared)
                  for s in stds})
  if len(members) != len(ema_powers) + len(stds) or not members:
    raise ValueError(f'posthoc_ema: ema_powers and stds must be distinct, '
                     f'and track at least one average; got ema_powers='
                     f'{ema_powers}, stds={stds}.')
  return _averages.averages(
      **members, initial=_stabilizers.initial_params(**shared))


# The fraction of snapshots placed near the end: chosen, with the tracked
# set of posthoc_ema, by the rule of benchmarks/synthetic/posthoc_long_runs.py.
NEAR_END_FRACTION = 0.25


def snapshot_steps(num_steps: int, num_snapshots: int) -> list[int]:
  """The steps at which to save snapshots for :func:`synthesize`.

  Step 0 and ``num_steps`` = T; a quarter of the snapshots at distances
  from T spaced evenly in log scale, from 1 step up to the even spacing;
  the others evenly spaced from step 0. A short average's final model
  depends only on the last few iterates, which only snapshots inside its
  window see (a power-law EMA's window is about t ** ema_power steps: 130
  steps for ema_power 0.4 at 200,000 steps), while long averages and
  averages updated every few hundred steps are matched best from evenly
  spread snapshots. With :func:`posthoc_ema`'s defaults and 40 snapshots
  this synthesizes the final model of the targets listed there within 2%
  of its distance from theta_T on runs of 1e3 to 1e6 steps (SGD on a noisy
  quadratic); 40 evenly spaced snapshots miss short averages by 75% or more
  at 2e5 steps.

  Steps are optimizer updates, the count a stabilizer keeps: under
  ``optax.MultiSteps`` (gradient accumulation) or ``apply_if_finite`` a
  loop's micro-step is not one. Label a snapshot with its state's
  ``count`` (:func:`synthesize` reads it from the state).

  If training stops early, at step S, save a snapshot at S too: only the
  evenly spaced snapshots lie before it, so averages wider than their
  spacing (about 4 T / (3 n) steps) are still recovered at S, shorter ones
  are not. If it runs longer, to T' > T, the saved steps stay valid and the
  model at T can still be synthesized from the snapshots up to T; for T'
  save the steps of ``snapshot_steps(T', n)`` after T as well (the last
  ones, near T', are what short averages need).

  Args:
    num_steps: T, the run's length, an integer >= 1.
    num_snapshots: n, how many snapshots besides step 0, an integer >= 1.

  Returns:
    At most ``num_snapshots + 1`` distinct increasing steps, the first 0,
    the last ``num_steps``.

  Raises:
    TypeError: an argument that is not an integer (``True`` is not one).
    ValueError: ``num_steps`` or ``num_snapshots`` below 1.

  Examples:
    >>> import optax_bema
    >>> optax_bema.snapshot_steps(1000, 8)
    [0, 167, 333, 500, 667, 833, 987, 999, 1000]
  """
  num_steps = _checks.whole_step(num_steps, 'snapshot_steps', 'num_steps')
  count = _checks.whole_step(num_snapshots, 'snapshot_steps',
                              'num_snapshots')
  if num_steps < 1 or count < 1:
    raise ValueError(f'snapshot_steps: need num_steps >= 1 and num_snapshots '
                     f'>= 1, got {num_steps} and {count}.')
  near = int(round(NEAR_END_FRACTION * count))
  even = count - near
  spaced = np.linspace(0, num_steps, even + 1)[:-1]
  distances = np.round(np.geomspace(1, num_steps / even, near + 1)[:-1]
                       if even else np.geomspace(1, num_steps, near))
  # Whole, distinct distances: each at least one more than the previous.
  distances = (np.maximum.accumulate(distances - np.arange(near))
               + np.arange(near))
  distances = distances[distances <= num_steps]
  steps = np.concatenate([[0, num_steps], spaced, num_steps - distances])
  return [int(s) for s in np.unique(np.round(steps).astype(np.int64))]
