"""The stabilizers' factories: EMA, BEMA, DEMA and OUEMA (the BEMA paper) and
EDM2's power-function EMA.

Each factory makes its kind's :class:`~optax_bema._schedule.Schedule` from
its arguments, by name, and hands it with the kind's rule (``_kinds``) to
the engine; the weights, the update steps, the burn-in, the non-finite guard
and where the state lives are the engine's.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from optax_bema import _engine
from optax_bema import _kinds
from optax_bema._schedule import Schedule


def initial_params(*, update_after: int = 0,
                   accumulator_dtype: Optional[jnp.dtype] = None,
                   offload_to_host: bool = False) -> _engine.Stabilizer:
  """Keeps theta_0, the weights at init or at the end of the burn-in.

  The post-hoc tools need theta_0 exactly (BEMA and OUEMA weigh it); this
  holds it and changes nothing else. Its model is theta_0.
  """
  return _engine.stabilizer(
      _kinds.INITIAL, Schedule(update_after=update_after, update_freq=1),
      accumulator_dtype=accumulator_dtype, offload_to_host=offload_to_host)


def ema(*, ema_power: float = 0.5, lag: float = 10.0,
        multiplier: float = 1.0, update_after: int = 0,
        update_freq: int = 400, min_ema_multiplier: float = 0.0,
        accumulator_dtype: Optional[jnp.dtype] = None,
        offload_to_host: bool = False,
        ) -> optax.GradientTransformationExtraArgs:
  r"""Exponential moving average of the weights, with power-law weights.

  On each update step t (counted from 1, absolute, burn-in included):

  .. math::
    \beta_t = \max((\rho + \gamma t)^{-\kappa}, \beta_{min}), \quad
    \bar\theta \leftarrow (1 - \beta_t) \bar\theta + \beta_t \theta_t,

  and the returned model is :math:`\bar\theta`. This is :func:`bema` with
  ``bias_power = inf``. State: one parameter-sized copy (an
  :class:`EmaState`). An update step with a non-finite iterate is skipped
  (the average keeps its last finite value) and counted in
  ``nonfinite_count``.

  Not ``optax.ema``, which averages the *updates* (a momentum inside an
  optimizer): this averages the *weights*, and goes last in the chain.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    lag: rho, the offset in the weights' base (lag + multiplier * t).
    multiplier: gamma, the step's factor in that base.
    update_after: tau, the burn-in: until step ``update_after`` the average
      is reset to the current weights.
    update_freq: phi, the average is updated every ``update_freq`` steps
      after the burn-in; in between the returned model is the one from the
      last update step. 1 updates every step.
    min_ema_multiplier: a floor on the EMA weight beta_t.
    accumulator_dtype: dtype of the state's copies, float32 for 16-bit
      weights by default. 16-bit copies round stochastically; updated every
      step, they hold deviations from the params, lost if those go non-finite.
    offload_to_host: keep the average in host memory (``pinned_host``)
      between update steps, as the BEMA paper does.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged. It tracks theta_t = params + updates, so it
    must be the LAST element of the chain. Read the model with
    ``optax_bema.averaged_params(opt_state, params)``.

  Examples:
    One SGD step from 0 to 1: at step 1, beta_1 = (10 + 1) ** -0.5.

    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(1.0), optax_bema.ema(update_freq=1))
    >>> params = jnp.zeros(2)
    >>> updates, state = tx.update(-jnp.ones(2), tx.init(params), params)
    >>> model = optax_bema.averaged_params(state, params + updates)
    >>> print(model, 11 ** -0.5)
    [0.30151135 0.30151135] 0.30151134457776363

  References:
    Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (Algorithm
    1 with the bias correction off; defaults from its Table 2).
  """
  schedule = Schedule(
      ema_power=ema_power, lag=lag, multiplier=multiplier,
      update_after=update_after, update_freq=update_freq,
      min_ema_multiplier=min_ema_multiplier)
  return _engine.stabilizer(_kinds.EMA, schedule,
                            accumulator_dtype=accumulator_dtype,
                            offload_to_host=offload_to_host)


def bema(*, ema_power: float = 0.5, bias_power: float = 0.2,
         bias_multiplier: Optional[float] = None, lag: float = 10.0,
         multiplier: float = 1.0, update_after: int = 0,
         update_freq: int = 400, min_ema_multiplier: float = 0.0,
         accumulator_dtype: Optional[jnp.dtype] = None,
         offload_to_host: bool = False,
         ) -> optax.GradientTransformationExtraArgs:
  r"""Bias-corrected EMA: EMA's variance reduction without its lag.

  On each update step t, with the EMA update of :func:`ema`,

  .. math::
    \alpha_t = (\rho + \gamma_\alpha t)^{-\eta}, \quad
    \hat\theta_t = \alpha_t (\theta_t - \theta_0) + \bar\theta_t,

  where :math:`\theta_0` are the weights at init (or at the end of the
  burn-in). The returned model is :math:`\hat\theta` from the last update
  step. State: three parameter-sized copies (theta_0, the EMA, theta at the
  last update), two when ``update_freq=1``: the readout then uses the
  current params, which are that theta.

  An update step whose iterate has a non-finite element is skipped and
  counted in ``nonfinite_count``. With ``update_freq=1``, if the params
  handed to ``averaged_params`` are not all finite (the training itself
  diverged), the readout cannot form the correction and returns the EMA,
  the best finite model the state holds.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    bias_power: eta, the power of the bias-correction weight alpha_t;
      ``inf`` turns the correction off (then this is :func:`ema`).
    bias_multiplier: gamma_alpha, the step's factor in alpha_t's base; by
      default ``multiplier``. A separate value lets alpha_t and beta_t decay
      on different clocks, e.g. the BEMA paper's theory-matched setting for
      SGD with step eta on curvature a: ``ema_power=1, lag=0,
      multiplier=1`` (beta_t = 1/t, the running mean) and ``bias_power=1,
      bias_multiplier=eta * a`` (alpha_t = 1 / (eta a t)).
    lag: rho, the offset in the weights' base (lag + multiplier * t).
    multiplier: gamma, the step's factor in that base.
    update_after: tau, the burn-in: until step ``update_after`` theta_0, the
      EMA and the returned model are reset to the current weights.
    update_freq: phi, the averages are updated every ``update_freq`` steps
      after the burn-in; in between the returned model is the one from the
      last update step. 1 updates every step.
    min_ema_multiplier: a floor on the EMA weight beta_t.
    accumulator_dtype: dtype of the state's copies, float32 for 16-bit
      weights by default. 16-bit copies round stochastically; updated every
      step, they hold deviations from the params, lost if those go non-finite.
    offload_to_host: keep the state in host memory between update steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged. It tracks theta_t = params + updates, so it
    must be the LAST element of the chain. Read the model with
    ``optax_bema.averaged_params(opt_state, params)``.

  Examples:
    After two steps 0 -> 1 -> 3 the EMA lags; BEMA adds
    alpha_2 (theta_2 - theta_0) with alpha_2 = 12 ** -0.2.

    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(1.0), optax_bema.averages(
    ...     ema=optax_bema.ema(update_freq=1),
    ...     bema=optax_bema.bema(update_freq=1)))
    >>> params, state = jnp.zeros(()), tx.init(jnp.zeros(()))
    >>> for grad in (-1.0, -2.0):
    ...   updates, state = jax.jit(tx.update)(jnp.asarray(grad), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> ema, bema = (float(optax_bema.averaged_params(state, params, name=k))
    ...              for k in ('ema', 'bema'))
    >>> round(ema, 4), round(bema - ema, 4), round(3 * 12 ** -0.2, 4)
    (1.0805, 1.8251, 1.8251)

  References:
    Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (Algorithm
    1; defaults from its Table 2).
  """
  schedule = Schedule(
      ema_power=ema_power, bias_power=bias_power,
      bias_multiplier=bias_multiplier, lag=lag, multiplier=multiplier,
      update_after=update_after, update_freq=update_freq,
      min_ema_multiplier=min_ema_multiplier)
  return _engine.stabilizer(_kinds.BEMA, schedule,
                            accumulator_dtype=accumulator_dtype,
                            offload_to_host=offload_to_host)


def dema(*, ema_power: float = 0.5, lag: float = 10.0,
         multiplier: float = 1.0, update_after: int = 0,
         update_freq: int = 400, min_ema_multiplier: float = 0.0,
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
  An update step whose iterate has a non-finite element is skipped and
  counted in ``nonfinite_count``.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    lag: rho, the offset in the weights' base (lag + multiplier * t).
    multiplier: gamma, the step's factor in that base.
    update_after: tau, the burn-in: until step ``update_after`` both
      averages are reset to the current weights.
    update_freq: phi, the averages are updated every ``update_freq`` steps
      after the burn-in. 1 updates every step.
    min_ema_multiplier: a floor on the EMA weight beta_t.
    accumulator_dtype: dtype of the state's copies, float32 for 16-bit
      weights by default. 16-bit copies round stochastically; updated every
      step, they hold deviations from the params, lost if those go non-finite.
    offload_to_host: keep the averages in host memory between update steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged; it must be the LAST element of the chain. Read
    the model with ``optax_bema.averaged_params(opt_state, params)``.

  Examples:
    One SGD step from 0 to 1: e1 = beta, e2 = beta ** 2, so the model is
    2 beta - beta ** 2 with beta = 11 ** -0.5.

    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(1.0), optax_bema.dema(update_freq=1))
    >>> params = jnp.zeros(())
    >>> updates, state = tx.update(-jnp.ones(()), tx.init(params), params)
    >>> model = optax_bema.averaged_params(state, params + updates)
    >>> round(float(model), 5), round(2 * 11 ** -0.5 - 1 / 11, 5)
    (0.51211, 0.51211)

  References:
    Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (Appendix
    C, the double EMA baseline).
  """
  schedule = Schedule(
      ema_power=ema_power, lag=lag, multiplier=multiplier,
      update_after=update_after, update_freq=update_freq,
      min_ema_multiplier=min_ema_multiplier)
  return _engine.stabilizer(_kinds.DEMA, schedule,
                            accumulator_dtype=accumulator_dtype,
                            offload_to_host=offload_to_host)


def ouema(*, ema_power: float = 0.5, bias_power: float = 0.2,
          bias_multiplier: Optional[float] = None, lag: float = 10.0,
          multiplier: float = 1.0, update_after: int = 0,
          update_freq: int = 400, min_ema_multiplier: float = 0.0,
          accumulator_dtype: Optional[jnp.dtype] = None,
          offload_to_host: bool = False,
          ) -> optax.GradientTransformationExtraArgs:
  r"""Ornstein-Uhlenbeck EMA: averages iterates debiased toward theta_0.

  On each update step t, with :math:`\beta_t` as in :func:`ema`,

  .. math::
    p_t = (1 + \gamma_\alpha t)^{-\eta}, \quad
    x_t = \frac{\theta_t - p_t \theta_0}{1 - p_t}, \quad
    \bar\theta \leftarrow (1-\beta_t) \bar\theta + \beta_t x_t,

  and the returned model is :math:`\bar\theta`. State: two parameter-sized
  copies (theta_0 and the average). An update step whose iterate has a
  non-finite element is skipped and counted in ``nonfinite_count``.

  Args:
    ema_power: kappa, the power of the EMA weight beta_t.
    bias_power: eta, the power of p_t; must be > 0, and the multiplier in
      its base > 0, so that p_t < 1.
    bias_multiplier: gamma_alpha, the step's factor in p_t's base; by default
      ``multiplier``.
    lag: rho, the offset in the EMA weight's base (lag + multiplier * t).
    multiplier: gamma, the step's factor in both bases.
    update_after: tau, the burn-in: until step ``update_after`` theta_0 and
      the average are reset to the current weights.
    update_freq: phi, the average is updated every ``update_freq`` steps
      after the burn-in. 1 updates every step.
    min_ema_multiplier: a floor on the EMA weight beta_t.
    accumulator_dtype: dtype of the state's copies, float32 for 16-bit
      weights by default. 16-bit copies round stochastically; updated every
      step, they hold deviations from the params, lost if those go non-finite.
    offload_to_host: keep the state in host memory between update steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged; it must be the LAST element of the chain. Read
    the model with ``optax_bema.averaged_params(opt_state, params)``.

  Examples:
    From theta_0 = 1, a step to 2: x_1 = (2 - p_1) / (1 - p_1) with
    p_1 = 2 ** -0.2, and the model is beta_1 x_1 + (1 - beta_1) theta_0.

    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(1.0), optax_bema.ouema(update_freq=1))
    >>> params = jnp.ones(())
    >>> updates, state = tx.update(-jnp.ones(()), tx.init(params), params)
    >>> model = float(optax_bema.averaged_params(state, params + updates))
    >>> p, beta = 2 ** -0.2, 11 ** -0.5
    >>> round(model, 4), round(beta * (2 - p) / (1 - p) + (1 - beta), 4)
    (3.3292, 3.3292)

  References:
    Block and Zhang, `EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes <https://arxiv.org/abs/2508.00180>`_, 2025 (Section 3
    and Appendix C: the OU-model estimator).
  """
  schedule = Schedule(
      ema_power=ema_power, bias_power=bias_power,
      bias_multiplier=bias_multiplier, lag=lag, multiplier=multiplier,
      update_after=update_after, update_freq=update_freq,
      min_ema_multiplier=min_ema_multiplier)
  return _engine.stabilizer(_kinds.OUEMA, schedule,
                            accumulator_dtype=accumulator_dtype,
                            offload_to_host=offload_to_host)


def power_ema(std: float, *, update_after: int = 0, update_freq: int = 1,
              accumulator_dtype: Optional[jnp.dtype] = None,
              offload_to_host: bool = False,
              ) -> optax.GradientTransformationExtraArgs:
  r"""EDM2's power-function EMA: an average whose width grows with t.

  Its profile after t steps is proportional to :math:`(\tau / t)^\gamma` on
  :math:`0 < \tau \le t`: a fixed *relative* width ``std``, the standard
  deviation of the profile as a fraction of t, however long training runs
  (a power-law EMA's width grows like :math:`t^\kappa` instead). On each
  update step, with :math:`t'` the steps since the burn-in,

  .. math::
    r_{t'} = (1 - \phi / t')^{\gamma + 1}, \quad
    \bar\theta \leftarrow r_{t'} \bar\theta + (1 - r_{t'}) \theta_t,

  (EDM2's Eq. 127 in steps; :math:`\phi` = ``update_freq``). The retention
  is 0 at the first update, so the average starts at that iterate.
  :math:`\gamma` is the largest real root of :math:`\gamma^3 + 7\gamma^2 +
  (16 - \sigma^{-2})\gamma + (12 - \sigma^{-2})`, :math:`\sigma` = ``std``
  (Eq. 126), which inverts :math:`\sigma = \sqrt{(\gamma + 1) / ((\gamma +
  2)^2 (\gamma + 3))}` (Eq. 123). ``std`` is EDM2's :math:`\sigma_{rel}`
  and ema-pytorch's ``sigma_rel``. State: one parameter-sized copy; an
  update step with a non-finite iterate is skipped and counted in
  ``nonfinite_count``.

  Args:
    std: sigma_rel, the profile's standard deviation relative to t, in
      (0, sqrt(1/12)); EDM2 tracks 0.05 and 0.10.
    update_after: the burn-in: until step ``update_after`` the average is
      reset to the current weights, and t' counts from its end.
    update_freq: the average is updated every ``update_freq`` steps after
      the burn-in.
    accumulator_dtype: dtype of the state's copies, float32 for 16-bit
      weights by default. 16-bit copies round stochastically; updated every
      step, they hold deviations from the params, lost if those go non-finite.
    offload_to_host: keep the average in host memory between update steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged; it must be the LAST element of the chain. Read
    the model with ``optax_bema.averaged_params(opt_state, params)``.

  Raises:
    ValueError: ``std`` outside (0, sqrt(1/12)), or a schedule that is not
      whole numbers of steps.
    TypeError: ``std`` not a number (it fixes gamma at construction).

  Examples:
    At std = 0.10, gamma = 6.9372; two steps from 0 to 1 then 3 give
    r_2 = (1/2) ** (gamma + 1), so the model is r_2 * 1 + (1 - r_2) * 3.

    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(1.0), optax_bema.power_ema(0.10))
    >>> params, state = jnp.zeros(()), tx.init(jnp.zeros(()))
    >>> for grad in (-1.0, -2.0):
    ...   updates, state = tx.update(jnp.asarray(grad), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> r = 0.5 ** (6.9372 + 1)
    >>> model = optax_bema.averaged_params(state, params)
    >>> round(float(model), 5), round(r + (1 - r) * 3, 5)
    (2.99184, 2.99184)

  References:
    Karras et al., `Analyzing and Improving the Training Dynamics of
    Diffusion Models <https://arxiv.org/abs/2312.02696>`_, 2024 (EDM2,
    Section 3 and Appendix C).
  """
  schedule = Schedule(std=std, update_after=update_after,
                      update_freq=update_freq)
  return _engine.stabilizer(_kinds.POWER_EMA, schedule,
                            accumulator_dtype=accumulator_dtype,
                            offload_to_host=offload_to_host)
