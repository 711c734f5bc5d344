"""Adaptive AdEMAMix: AdEMAMix whose mixing coefficient grows with noise.

The two momenta, the second moment and the mixing are
``optax.contrib.scale_by_ademamix``, called each step with that step's
alpha; this module adds only the gradient-noise estimate that sets it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from optax_bema import _checks
from optax_bema import _tree


class AdaptiveAdemamixState(NamedTuple):
  """State of the adaptive element of :func:`adaptive_ademamix`."""
  ademamix: contrib.ScaleByAdemamixState  # m1, m2, nu and their counts
  grad_mean: optax.Updates      # EMA of the gradient, mu
  grad_variance: optax.Updates  # EMA of its variance, sigma^2
  noise_fraction: jax.Array     # s at the last step, float32
  alpha: jax.Array              # alpha_t used at the last step, float32


def adaptive_ademamix(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 4.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    variance_decay: float = 0.99,
    clip_norm: Optional[float] = 1.0,
    mu_dtype: Optional[jnp.dtype] = None,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdEMAMix whose slow momentum weighs more when the gradient is noisy.

  AdamW with a fast momentum :math:`m_1` (``b1``) and a slow one
  :math:`m_2` (``b3``), mixed with a coefficient that follows the gradient
  noise:

  .. math::
    \theta \leftarrow \theta - \eta_t \left(
      \frac{\hat m_1 + \alpha_t m_2}{\sqrt{\hat\nu} + \epsilon}
      + \lambda \theta \right), \quad \alpha_t = \alpha (1 + s).

  The normalised gradient variance s is the share of the gradient's second
  moment that is noise,

  .. math::
    \delta = g - \mu, \quad
    \mu \leftarrow \mu + (1-\rho) \delta, \quad
    \sigma^2 \leftarrow \rho (\sigma^2 + (1-\rho) \delta^2), \qquad
    s = \frac{\sum_i \sigma_i^2}{\sum_i \sigma_i^2 + \sum_i \mu_i^2}
      \in [0, 1],

  exponentially weighted per coordinate (:math:`\rho` is
  ``variance_decay``; both start at the first gradient with zero variance,
  so no bias correction is needed) and summed over all coordinates: s is
  :math:`1 - \|E g\|^2 / E\|g\|^2`, 0 exactly for a constant gradient and
  near 1 for zero-mean noise, so :math:`\alpha_t \in [\alpha, 2\alpha]`.

  The update is ``optax.contrib.scale_by_ademamix``'s, called each step with
  :math:`\alpha_t` (a schedule for ``alpha`` gives the base, read at
  AdEMAMix's own count), then the decoupled weight decay and the learning
  rate, as in ``optax.contrib.ademamix``. The gradient is first clipped to
  global norm ``clip_norm`` (1.0, as in the report) inside the optimizer;
  s is measured on the clipped gradient, the one the momenta see;
  ``clip_norm=None`` clips nothing. For a constant gradient the iterates are
  those of ``optax.chain(optax.clip_by_global_norm(clip_norm),
  optax.contrib.ademamix(learning_rate, ..., alpha=alpha))`` exactly.
  Memory: AdEMAMix's three parameter-sized buffers, plus two (mu, sigma^2).

  Every argument after ``learning_rate`` is keyword-only:
  ``optax.contrib.ademamix``'s seventh positional argument is ``eps_root``
  where this one would take ``weight_decay``, and its ``alpha`` defaults to
  5.0 (4.0 here, the report's) and ``weight_decay`` to 0.0 (0.01 here).

  Args:
    learning_rate: eta, a float or an optax schedule.
    b1: decay of the fast momentum m1.
    b2: decay of the second moment nu.
    b3: decay of the slow momentum m2 (a float or a schedule).
    alpha: the base mixing coefficient (a float or a schedule).
    eps: added to the denominator, outside the square root.
    weight_decay: lambda, decoupled and scaled by the learning rate.
    variance_decay: rho, the decay of the gradient mean and variance EMAs.
    clip_norm: the global-norm clip applied first; None disables it.
    mu_dtype: dtype of AdEMAMix's moments, as in optax; mu and sigma^2 are
      float32 at least.
    mask: an optax-style mask of the leaves weight decay applies to.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: a chain of the clip (when
    ``clip_norm`` is set), the adaptive AdEMAMix scaling, the weight decay
    and the learning rate. Its :class:`AdaptiveAdemamixState` holds s and
    alpha_t of the last step: read them with
    ``optax.tree.get(state, 'noise_fraction')`` and
    ``optax.tree.get(state, 'alpha')``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax_bema.adaptive_ademamix(1e-3)
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for seed in range(3):
    ...   noise = jax.random.normal(jax.random.key(seed), (3,))
    ...   grads = {'w': params['w'] + noise}
    ...   updates, state = jax.jit(tx.update)(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> 4.0 < float(optax.tree.get(state, 'alpha')) <= 8.0
    True

  References:
    Pagliardini, Ablin and Grangier, `The AdEMAMix Optimizer: Better, Faster,
    Older <https://arxiv.org/abs/2409.03137>`_, 2024.

    `Adaptive Exponential Moving Average Mixing: Analysis of a Negative
    Result in Language Model Optimization`, report, 26 October 2025 (this
    variant; it trained 400 steps and found it behind AdamW, ahead of plain
    AdEMAMix).
  """
  for name, value in (('b1', b1), ('b2', b2), ('b3', b3),
                      ('variance_decay', variance_decay)):
    _checks.check('adaptive_ademamix', name, value, *_checks.DECAY)
  for name, value in (('alpha', alpha), ('eps', eps),
                      ('weight_decay', weight_decay),
                      ('learning_rate', learning_rate)):
    _checks.check('adaptive_ademamix', name, value, *_checks.NONNEGATIVE)
  if clip_norm is not None:
    _checks.check('adaptive_ademamix', 'clip_norm', clip_norm,
                  lambda v: v > 0, 'be > 0 or None')
  clip = () if clip_norm is None else (optax.clip_by_global_norm(clip_norm),)
  return optax.chain(
      *clip,
      _scale_by_adaptive_ademamix(b1, b2, b3, alpha, eps, variance_decay,
                                  mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def _scale_by_adaptive_ademamix(b1, b2, b3, alpha, eps, variance_decay,
                                mu_dtype) -> optax.GradientTransformation:
  """AdEMAMix's scaling with alpha_t = alpha (1 + s) set each step."""
  def ademamix(alpha_t):
    return contrib.scale_by_ademamix(b1=b1, b2=b2, b3=b3, alpha=alpha_t,
                                     eps=eps, mu_dtype=mu_dtype)

  def init_fn(params):
    return AdaptiveAdemamixState(
        ademamix=ademamix(alpha).init(params),
        grad_mean=_tree.zeros_tree(params, None),
        grad_variance=_tree.zeros_tree(params, None),
        noise_fraction=jnp.zeros([], _tree.SCALAR_DTYPE),
        alpha=jnp.zeros([], _tree.SCALAR_DTYPE))

  def update_fn(updates, state, params=None):
    del params
    first = state.ademamix.count == 0
    rho = jnp.asarray(variance_decay, _tree.SCALAR_DTYPE)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates,
                         state.grad_mean)
    delta = jax.tree.map(jnp.subtract, grads, state.grad_mean)
    mean = jax.tree.map(
        lambda g, m, d: jnp.where(first, g, m + (1 - rho.astype(m.dtype)) * d),
        grads, state.grad_mean, delta)
    variance = jax.tree.map(
        lambda v, d: jnp.where(first, 0, rho.astype(v.dtype)
                               * (v + (1 - rho.astype(v.dtype)) * d**2)),
        state.grad_variance, delta)
    noise = _tree.tree_sum(variance)
    noise_fraction = noise / (
        noise + _tree.tree_sum(jax.tree.map(jnp.square, mean))
        + jnp.finfo(_tree.SCALAR_DTYPE).tiny)
    base = alpha(state.ademamix.count_m2) if callable(alpha) else alpha
    alpha_t = jnp.asarray(base, _tree.SCALAR_DTYPE) * (1 + noise_fraction)
    scaled, ademamix_state = ademamix(alpha_t).update(updates,
                                                      state.ademamix)
    # alpha_t is a float32 array: without the cast, bfloat16 and float16
    # updates would come back float32, unlike optax.contrib.ademamix's.
    updates = jax.tree.map(lambda u, g: u.astype(g.dtype), scaled, updates)
    return updates, AdaptiveAdemamixState(
        ademamix=ademamix_state, grad_mean=mean, grad_variance=variance,
        noise_fraction=noise_fraction, alpha=alpha_t)

  return optax.GradientTransformation(init_fn, update_fn)
