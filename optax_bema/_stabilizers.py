"""EMA, BEMA, DEMA and OUEMA: the stabilizers of the BEMA paper.

Each is an update rule plugged into the shared core (``_core.stabilizer``):
the weight schedule, the update-step predicate, the burn-in reset, the
non-finite guard and the readout are written once there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_bema import _checks
from optax_bema import _core
from optax_bema import _placement

_REFERENCES = """
  References:
    Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (BEMA,
    Algorithm 1 and Appendix C; defaults from its Table 2).
"""

_SHARED_ARGS = """
    lag: rho, the offset in the weights' base (lag + multiplier * t).
    multiplier: gamma, the step's factor in that base.
    update_after: tau, the burn-in: until step ``update_after`` the average,
      theta_0 and the returned model are all reset to the current weights.
    update_freq: phi, the average is updated every ``update_freq`` steps
      after the burn-in; in between the returned model is the one from the
      last update step. 1 updates every step.
    min_ema_multiplier: a floor on the EMA weight beta_t.
    accumulator_dtype: dtype of the averages; by default float32 for
      bfloat16/float16 weights and the weights' own dtype otherwise.
    offload_to_host: keep the parameter-sized state (theta_0, the averages)
      in host memory (``memory_kind="pinned_host"``, shardings kept) and move
      it to the accelerator only on update steps, as the BEMA paper does to
      save accelerator memory. Steps between updates move nothing.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged, bit for bit. It tracks theta_t = params +
    updates, so it must be the LAST element of the chain, after the
    optimizer and any scaling. Read the model with
    ``optax_bema.averaged_params(opt_state, params)``.
"""

_EXAMPLE = """
  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.adamw(1e-2), optax_bema.{name}(update_freq=1))
    >>> params = {{'w': jnp.ones(3)}}
    >>> state = tx.init(params)
    >>> grads = {{'w': jnp.full(3, 0.5)}}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> model = optax_bema.averaged_params(state, params)
    >>> model['w'].shape
    (3,)
"""


def _document(fn):
  fn.__doc__ = (fn.__doc__ + _SHARED_ARGS + _EXAMPLE.format(name=fn.__name__)
                + _REFERENCES)
  return fn


# --- EMA -------------------------------------------------------------------


class EmaState(NamedTuple):
  """State of :func:`ema`: one parameter-sized copy."""
  count: jax.Array            # steps seen, int32, saturating
  nonfinite_count: jax.Array  # update steps skipped for a non-finite iterate
  ema: optax.Params


_EMA = _core.Rule(
    name='ema', state_cls=EmaState, averages=('ema',), reset_scalars={},
    advance=lambda w, theta, s: {'ema': _core.ema_tree(w.ema, s.ema, theta)})
_core.register_readout(
    EmaState, lambda s, params: _core.cast_like_params(s.ema, params))


@_document
def ema(ema_power: float = 0.5, lag: float = 10.0, multiplier: float = 1.0,
        update_after: int = 0, update_freq: int = 400,
        min_ema_multiplier: float = 0.0,
        accumulator_dtype: Optional[jnp.dtype] = None,
        offload_to_host: bool = False,
        ) -> optax.GradientTransformationExtraArgs:
  r"""Exponential moving average of the weights, with power-law weights.

  On each update step t (counted from 1, absolute, burn-in included):

  .. math::
    \beta_t = \max((\rho + \gamma t)^{-\kappa}, \beta_{min}), \quad
    \bar\theta \leftarrow (1 - \beta_t) \bar\theta + \beta_t \theta_t,

  and the returned model is :math:`\bar\theta`. This is BEMA with
  ``bias_power = inf``. State: one parameter-sized copy.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
  """
  return _core.stabilizer(
      _EMA, ema_power=ema_power, bias_power=0.0, lag=lag,
      multiplier=multiplier, update_after=update_after,
      update_freq=update_freq, min_ema_multiplier=min_ema_multiplier,
      accumulator_dtype=accumulator_dtype, offload_to_host=offload_to_host)


# --- BEMA ------------------------------------------------------------------


class BemaState(NamedTuple):
  """State of :func:`bema`.

  ``last_iterate`` is theta at the last update step; it is ``None`` when
  ``update_freq=1``, where the current params are that iterate.
  """
  count: jax.Array
  nonfinite_count: jax.Array
  initial_params: optax.Params       # theta_0
  ema: optax.Params
  bias_weight: jax.Array             # alpha at the last update step
  last_iterate: Optional[optax.Params] = None


def _bema_advance(w, theta, s):
  new = {'ema': _core.ema_tree(w.ema, s.ema, theta), 'bias_weight': w.bias}
  if s.last_iterate is not None:
    new['last_iterate'] = theta
  return new


def _bema_readout(s, params):
  anchor = s.last_iterate
  if anchor is None:
    anchor = jax.tree.map(
        lambda p, e: e if isinstance(e, optax.MaskedNode)
        else _placement.like_sharding(jnp.asarray(p, e.dtype), e), params, s.ema)
  model = jax.tree.map(
      lambda x, x0, e: s.bias_weight.astype(e.dtype) * (x - x0) + e,
      anchor, s.initial_params, s.ema)
  return _core.cast_like_params(model, params)


_core.register_readout(BemaState, _bema_readout)


@_document
def bema(ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10.0,
         multiplier: float = 1.0, update_after: int = 0,
         update_freq: int = 400, min_ema_multiplier: float = 0.0,
         accumulator_dtype: Optional[jnp.dtype] = None,
         offload_to_host: bool = False,
         ) -> optax.GradientTransformationExtraArgs:
  r"""Bias-corrected EMA: EMA's variance reduction without its lag.

  On each update step t, with the EMA update of :func:`ema`,

  .. math::
    \alpha_t = (\rho + \gamma t)^{-\eta}, \quad
    \hat\theta_t = \alpha_t (\theta_t - \theta_0) + \bar\theta_t,

  where :math:`\theta_0` are the weights at init (or at the end of the
  burn-in). The returned model is :math:`\hat\theta` from the last update
  step. State: three parameter-sized copies (theta_0, the EMA, theta at the
  last update), two when ``update_freq=1`` (the readout then uses the
  current params, which are that theta).

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    bias_power: eta, the power of the bias-correction weight alpha_t.
  """
  rule = _core.Rule(
      name='bema', state_cls=BemaState, advance=_bema_advance,
      reset_scalars={'bias_weight': 0.0},
      averages=(('initial_params', 'ema') if _checks.is_static(update_freq)
                and int(update_freq) == 1
                else ('initial_params', 'ema', 'last_iterate')))
  return _core.stabilizer(
      rule, ema_power=ema_power, bias_power=bias_power, lag=lag,
      multiplier=multiplier, update_after=update_after,
      update_freq=update_freq, min_ema_multiplier=min_ema_multiplier,
      accumulator_dtype=accumulator_dtype, offload_to_host=offload_to_host)


# --- DEMA ------------------------------------------------------------------


class DemaState(NamedTuple):
  """State of :func:`dema`: two parameter-sized copies."""
  count: jax.Array
  nonfinite_count: jax.Array
  ema: optax.Params
  ema_of_ema: optax.Params


def _dema_advance(w, theta, s):
  return {'ema': _core.ema_tree(w.ema, s.ema, theta),
          'ema_of_ema': lambda new: _core.ema_tree(w.ema, s.ema_of_ema, new['ema'])}


_DEMA = _core.Rule(name='dema', state_cls=DemaState,
                   averages=('ema', 'ema_of_ema'), advance=_dema_advance,
                   reset_scalars={})
_core.register_readout(
    DemaState, lambda s, params: _core.cast_like_params(
        jax.tree.map(lambda e1, e2: 2 * e1 - e2, s.ema, s.ema_of_ema), params))


@_document
def dema(ema_power: float = 0.5, lag: float = 10.0, multiplier: float = 1.0,
         update_after: int = 0, update_freq: int = 400,
         min_ema_multiplier: float = 0.0,
         accumulator_dtype: Optional[jnp.dtype] = None,
         offload_to_host: bool = False,
         ) -> optax.GradientTransformationExtraArgs:
  r"""Double EMA: extrapolates an EMA and its EMA to cancel the lag.

  On each update step t, with :math:`\beta_t` as in :func:`ema`,

  .. math::
    e_1 \leftarrow (1-\beta_t) e_1 + \beta_t \theta_t, \quad
    e_2 \leftarrow (1-\beta_t) e_2 + \beta_t e_1, \quad
    \hat\theta = 2 e_1 - e_2

  (``e_2`` averages the new ``e_1``). State: two parameter-sized copies.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
  """
  return _core.stabilizer(
      _DEMA, ema_power=ema_power, bias_power=0.0, lag=lag,
      multiplier=multiplier, update_after=update_after,
      update_freq=update_freq, min_ema_multiplier=min_ema_multiplier,
      accumulator_dtype=accumulator_dtype, offload_to_host=offload_to_host)


# --- OUEMA -----------------------------------------------------------------


class OuemaState(NamedTuple):
  """State of :func:`ouema`: two parameter-sized copies."""
  count: jax.Array
  nonfinite_count: jax.Array
  initial_params: optax.Params  # theta_0
  ema: optax.Params


def _ouema_advance(w, theta, s, *, multiplier, bias_power):
  p = _core.power_law(w.t, lag=1.0, multiplier=multiplier, power=bias_power)

  def debiased(x, x0):
    p_ = p.astype(x.dtype)
    return (x - p_ * x0) / (1 - p_)
  x = jax.tree.map(debiased, theta, s.initial_params)
  return {'ema': _core.ema_tree(w.ema, s.ema, x)}


_core.register_readout(
    OuemaState, lambda s, params: _core.cast_like_params(s.ema, params))


@_document
def ouema(ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10.0,
          multiplier: float = 1.0, update_after: int = 0,
          update_freq: int = 400, min_ema_multiplier: float = 0.0,
          accumulator_dtype: Optional[jnp.dtype] = None,
          offload_to_host: bool = False,
          ) -> optax.GradientTransformationExtraArgs:
  r"""Ornstein-Uhlenbeck EMA: averages iterates debiased toward theta_0.

  On each update step t, with :math:`\beta_t` as in :func:`ema`,

  .. math::
    p_t = (1 + \gamma t)^{-\eta}, \quad
    x_t = \frac{\theta_t - p_t \theta_0}{1 - p_t}, \quad
    \bar\theta \leftarrow (1-\beta_t) \bar\theta + \beta_t x_t,

  and the returned model is :math:`\bar\theta`. State: two parameter-sized
  copies (theta_0 and the average).

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    bias_power: eta, the power of p_t; must be > 0, and ``multiplier`` > 0,
      so that p_t < 1.
  """
  _checks.check(lambda v: v > 0, bias_power,
              f'ouema: bias_power must be > 0 (p_t = (1 + multiplier t) ** '
              f'-bias_power must stay below 1), got {bias_power}.')
  _checks.check(lambda v: v > 0, multiplier,
              f'ouema: multiplier must be > 0 (p_t = (1 + multiplier t) ** '
              f'-bias_power must stay below 1), got {multiplier}.')
  rule = _core.Rule(
      name='ouema', state_cls=OuemaState, averages=('initial_params', 'ema'),
      reset_scalars={},
      advance=lambda w, theta, s: _ouema_advance(
          w, theta, s, multiplier=multiplier, bias_power=bias_power))
  return _core.stabilizer(
      rule, ema_power=ema_power, bias_power=bias_power, lag=lag,
      multiplier=multiplier, update_after=update_after,
      update_freq=update_freq, min_ema_multiplier=min_ema_multiplier,
      accumulator_dtype=accumulator_dtype, offload_to_host=offload_to_host)
