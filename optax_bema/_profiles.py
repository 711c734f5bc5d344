"""Profiles: every stabilizer's model as fixed weights on the iterates.

After step T each stabilizer returns a fixed linear combination of the
iterates theta_0, ..., theta_T,

.. math::
  \\hat\\theta_T = \\sum_{s=0}^{T} w_s \\theta_s,

whose weight vector w, the *profile*, depends only on the hyperparameters and
T, never on the iterates. Two things follow. Replay: the model of any
stabilizer is recovered exactly from the iterates at the steps it reads
(:func:`read_steps`). Post-hoc synthesis: an average never tracked during
training is approximated by the combination of tracked averages whose
profiles best match its profile in least squares (:func:`fit`), as the
post-hoc EMA of Karras et al. (2024) does for its power-function EMAs.

Pure NumPy in float64: these are small vectors of length T + 1, computed once
per query, and the exact weights are the point.

References:
  Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate Averaging
  Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (the stabilizers,
  Algorithm 1 and Appendix C).

  Karras et al., `Analyzing and Improving the Training Dynamics of Diffusion
  Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2; post-hoc EMA,
  Section 3 and its appendix on post-hoc EMA).
"""

from __future__ import annotations

import numbers
from typing import Mapping

import numpy as np

KINDS = ('ema', 'bema', 'dema', 'ouema')

# The transforms' defaults (Table 2 of the BEMA paper), for keys left out.
DEFAULT_HYPERPARAMS = dict(ema_power=0.5, bias_power=0.2, lag=10.0,
                           multiplier=1.0, update_after=0, update_freq=400,
                           min_ema_multiplier=0.0, bias_multiplier=None)


def _whole(name: str, value, least: int) -> int:
  """``value`` as an int, if it is a whole number >= ``least``."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not float(value).is_integer() or value < least):
    raise ValueError(f'profiles: {name} must be an integer >= {least}, '
                     f'got {value!r}.')
  return int(value)  # type: ignore[call-overload]  # a whole Real


def _resolve(kind: str, hyperparams: Mapping[str, float]) -> dict:
  """The hyperparameters with defaults filled in, checked."""
  if kind not in KINDS:
    raise ValueError(f'profiles: kind must be one of {KINDS}, got {kind!r}.')
  unknown = set(hyperparams) - set(DEFAULT_HYPERPARAMS)
  if unknown:  # a misspelt key would otherwise silently take its default
    raise ValueError(f'profiles: unknown hyperparameters {sorted(unknown)}; '
                     f'known: {sorted(DEFAULT_HYPERPARAMS)}.')
  hp: dict = {**DEFAULT_HYPERPARAMS, **hyperparams}
  if hp['bias_multiplier'] is None:  # the bias weight shares the EMA's base
    hp['bias_multiplier'] = hp['multiplier']
  hp['update_after'] = _whole('update_after', hp['update_after'], 0)
  hp['update_freq'] = _whole('update_freq', hp['update_freq'], 1)
  if kind == 'ouema' and not (hp['bias_power'] > 0
                              and hp['bias_multiplier'] > 0):
    raise ValueError(
        'profiles: ouema needs bias_power > 0 and bias_multiplier > 0 so '
        f'that p_t = (1 + bias_multiplier t) ** -bias_power < 1; got {hp}.')
  return hp


def _update_steps(hp: Mapping[str, float], num_steps: int) -> np.ndarray:
  """The update steps up to ``num_steps`` (see :func:`read_steps`)."""
  first = hp['update_after'] + hp['update_freq']
  return np.arange(first, num_steps + 1, hp['update_freq'], dtype=np.int64)


def read_steps(kind: str, hyperparams: Mapping[str, float],
               num_steps: int) -> np.ndarray:
  """The steps whose iterates a stabilizer reads to make its model at T.

  The model after step T = ``num_steps`` depends on theta_a, with a =
  min(update_after, T) the last burn-in step (a = 0, the weights at init,
  without a burn-in), and on theta_t at every update step t <= T, t >
  update_after with (t - update_after) a multiple of ``update_freq``. Saving
  these iterates is enough to replay the stabilizer exactly:
  ``profile_weights(...)[steps] @ iterates``; every other weight is zero.

  Args:
    kind: ``'ema'``, ``'bema'``, ``'dema'`` or ``'ouema'``.
    hyperparams: the stabilizer's arguments (``ema_power``, ``bias_power``,
      ``lag``, ``multiplier``, ``update_after``, ``update_freq``,
      ``min_ema_multiplier``); missing ones take the transforms' defaults.
    num_steps: T, the number of optimizer steps taken.

  Returns:
    The steps, increasing, as an int64 array; the first is a.

  Examples:
    >>> from optax_bema import _profiles
    >>> _profiles.read_steps('bema', dict(update_after=5, update_freq=3),
    ...                      14).tolist()
    [5, 8, 11, 14]
  """
  hp = _resolve(kind, hyperparams)
  num_steps = _whole('num_steps', num_steps, 0)
  anchor = min(hp['update_after'], num_steps)
  return np.concatenate([[anchor], _update_steps(hp, num_steps)])


def _suffix_products(keep: np.ndarray) -> np.ndarray:
  """prod_{j > k} keep_j for each k, without a division.

  A reverse cumulative product rather than exp(cumsum(log)) or a ratio of
  prefix products: a weight beta_t = 1 (keep = 0) wipes out everything before
  it, and that must come out as exact zeros, not 0/0.
  """
  after = np.ones_like(keep)
  after[:-1] = np.cumprod(keep[::-1])[::-1][1:]
  return after


def profile_weights(kind: str, hyperparams: Mapping[str, float],
                    num_steps: int) -> np.ndarray:
  r"""The weights w with model_T = sum_s w_s theta_s, for one stabilizer.

  With update steps :math:`u_1 < \dots < u_K \le T` (see :func:`read_steps`),
  :math:`\beta_k = \max((\rho + \gamma u_k)^{-\kappa}, \beta_{min})` and
  :math:`P_k = \prod_{j > k} (1 - \beta_j)`, unrolling each recursion of the
  BEMA paper (Algorithm 1 and Appendix C) gives, with :math:`e_s` the unit
  vector on theta_s and a the last burn-in step (0 without one):

  * EMA: :math:`w = P_0 e_a + \sum_k \beta_k P_k e_{u_k}`
    (:math:`P_0 = \prod_k (1 - \beta_k)`).
  * BEMA: the EMA's w plus :math:`\alpha_K (e_{u_K} - e_a)`,
    :math:`\alpha_K = (\rho + \gamma u_K)^{-\eta}`.
  * DEMA (:math:`2 e_1 - e_2`, :math:`e_2` averaging the new :math:`e_1`):
    :math:`w = P_0 (1 - S_0) e_a + \sum_k \beta_k P_k (2 - \beta_k - S_k)
    e_{u_k}`, :math:`S_k = \sum_{j > k} \beta_j`, :math:`S_0 = \sum_j
    \beta_j` (found by running the recursion backwards: the sensitivities
    of the model to the two averages after update k are
    :math:`P_k (2 - S_k)` and :math:`-P_k`).
  * OUEMA, the EMA of :math:`x_k = (\theta_{u_k} - p_k \theta_a) / (1 -
    p_k)`, :math:`p_k = (1 + \gamma u_k)^{-\eta}`:
    :math:`w = (P_0 - \sum_k \beta_k P_k p_k / (1 - p_k)) e_a +
    \sum_k \beta_k P_k / (1 - p_k) e_{u_k}`.

  Every profile sums to 1. For T <= update_after it is :math:`e_T`, and
  before the first update step :math:`e_a`. O(T) time: 1e5 steps take
  milliseconds.

  Args:
    kind: ``'ema'``, ``'bema'``, ``'dema'`` or ``'ouema'``.
    hyperparams: the stabilizer's arguments (``ema_power``, ``bias_power``,
      ``lag``, ``multiplier``, ``update_after``, ``update_freq``,
      ``min_ema_multiplier``); missing ones take the transforms' defaults;
      ``bias_power`` is ignored by EMA and DEMA. The weights use the
      absolute step t, burn-in included, as the transforms do.
    num_steps: T, the number of optimizer steps taken.

  Returns:
    w, a float64 array of shape ``(num_steps + 1,)``; ``w[s]`` weighs
    theta_s, ``w[0]`` the weights at init.

  Examples:
    With beta_t = 1 / t, updates at steps 2 and 4 weigh theta_0, theta_2
    and theta_4 by (1 - 1/2)(1 - 1/4), (1/2)(1 - 1/4) and 1/4:

    >>> import numpy as np
    >>> from optax_bema import _profiles
    >>> w = _profiles.profile_weights(
    ...     'ema', dict(ema_power=1.0, lag=0.0, update_freq=2), 4)
    >>> np.round(w, 3).tolist()
    [0.375, 0.0, 0.375, 0.0, 0.25]
  """
  hp = _resolve(kind, hyperparams)
  num_steps = _whole('num_steps', num_steps, 0)
  anchor = min(hp['update_after'], num_steps)
  steps = _update_steps(hp, num_steps)
  w = np.zeros(num_steps + 1)
  if steps.size == 0:
    w[anchor] = 1.0
    return w
  base = float(hp['lag']) + float(hp['multiplier']) * steps.astype(np.float64)
  beta = np.maximum(base ** -float(hp['ema_power']),
                    float(hp['min_ema_multiplier']))
  after = _suffix_products(1.0 - beta)
  before_all = after[0] * (1.0 - beta[0])
  if kind == 'dema':
    later = np.cumsum(beta[::-1])[::-1] - beta  # S_k = sum_{j > k} beta_j
    w[steps] = beta * after * (2.0 - beta - later)
    w[anchor] += before_all * (1.0 - later[0] - beta[0])
    return w
  ema = beta * after
  if kind == 'ouema':
    p = ((1.0 + float(hp['bias_multiplier']) * steps)
         ** -float(hp['bias_power']))
    w[steps] = ema / (1.0 - p)
    w[anchor] += before_all - np.sum(ema * p / (1.0 - p))
    return w
  w[steps] = ema
  w[anchor] += before_all
  if kind == 'bema':
    alpha = ((float(hp['lag']) + float(hp['bias_multiplier']) * steps[-1])
             ** -float(hp['bias_power']))
    w[steps[-1]] += alpha
    w[anchor] -= alpha
  return w


def fit(target: np.ndarray, basis: np.ndarray, *, ridge: float = 1e-6
        ) -> tuple[np.ndarray, np.ndarray]:
  r"""Least-squares coefficients that combine profiles into a target profile.

  Solves

  .. math::
    \min_x \|B^\top x - w\|_2^2 + \lambda^2 \|D x\|_2^2,

  B the basis (one profile per row, e.g. the profile of each saved snapshot
  of a tracked average, and unit vectors for saved iterates such as theta_T
  and theta_0), w the target, D the rows' norms. The synthesized model is
  then ``coefficients @ saved_arrays``, as in the post-hoc EMA of Karras et
  al. (2024), who solve the same problem through its normal equations.

  The rows are scaled to unit norm (unit vectors and long, flat averages
  differ in norm by orders of magnitude) and the scaled problem is solved
  through its SVD, never through the normal equations, which would square
  its condition number. Snapshots of one average at nearby steps, or of
  averages with close powers, are nearly collinear: exact least squares may
  then need large coefficients of alternating sign, and the synthesized
  model, a sum of that many stored arrays, multiplies their rounding error
  by the coefficients' size. The ridge :math:`\lambda` = ``ridge`` times the
  largest singular value damps only the directions whose singular values
  fall below it, which the stored arrays' rounding hides anyway; so
  ``ridge`` should be about their relative precision. The default 1e-6
  suits float32 snapshots and leaves well-separated tracked averages
  (condition numbers up to about 1e3) unchanged; about 1e-3 suits bfloat16.

  Args:
    target: the profile to match, shape ``(T + 1,)``, or several as rows of
      a ``(m, T + 1)`` array.
    basis: the available profiles as rows, shape ``(n, T + 1)``.
    ridge: the relative Tikhonov weight; 0 gives the minimum-norm
      least-squares solution.

  Returns:
    ``(coefficients, relative_residual)``: coefficients of shape ``(n,)``
    (``(m, n)`` for several targets) and
    :math:`\|B^\top x - w\| / \|w\|`, a scalar (shape ``(m,)``), which
    tells how far to trust the synthesized model.

  Examples:
    BEMA is its EMA plus alpha_T (theta_T - theta_0), so it is synthesized
    exactly from that EMA, theta_T and theta_0 (alpha_100 = 110 ** -0.2):

    >>> import numpy as np
    >>> from optax_bema import _profiles
    >>> hp, t = dict(update_freq=1), 100
    >>> basis = np.stack([_profiles.profile_weights('ema', hp, t),
    ...                   np.eye(t + 1)[t], np.eye(t + 1)[0]])
    >>> x, residual = _profiles.fit(
    ...     _profiles.profile_weights('bema', hp, t), basis)
    >>> np.round(x, 4).tolist(), bool(residual < 1e-9)
    ([1.0, 0.3906, -0.3906], True)
  """
  basis = np.atleast_2d(np.asarray(basis, np.float64))
  target = np.asarray(target, np.float64)
  if target.shape[-1] != basis.shape[1]:
    raise ValueError(f'fit: target has length {target.shape[-1]} but the '
                     f'basis profiles have length {basis.shape[1]}.')
  norms = np.linalg.norm(basis, axis=1)
  norms[norms == 0] = 1.0  # an all-zero row gets coefficient 0 either way
  u, s, vt = np.linalg.svd((basis / norms[:, None]).T, full_matrices=False)
  lam = ridge * s[0]
  # s / (s^2 + lam^2), written to give 0 (not 0/0) on exactly null directions.
  gain = np.divide(s, s * s + lam * lam, out=np.zeros_like(s),
                   where=s > s[0] * np.finfo(np.float64).eps * len(s))
  projected = u.T @ target.T
  scaled = vt.T @ (gain.reshape((-1,) + (1,) * (target.ndim - 1)) * projected)
  coefficients = (scaled / norms.reshape((-1,) + (1,) * (target.ndim - 1))).T
  residual = np.linalg.norm(coefficients @ basis - target, axis=-1)
  return coefficients, residual / np.linalg.norm(target, axis=-1)
