"""PACE: AdamW whose live weights are pulled toward their own EMA.

Built the way optax builds its optimizers: :func:`pace` is ``optax.adamw``
itself (``scale_by_adam``, ``add_decayed_weights``,
``scale_by_learning_rate``), wrapped by :func:`_pull_toward_ema`, which adds
to AdamW's step the pullback toward the EMA, with a strength read from the
second moment in AdamW's state, and updates the EMA, which never takes in a
non-finite iterate. With ``pullback=0`` the wrapper adds nothing: the
iterates are ``optax.adamw``'s, the same operations in the same order.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_bema import _checks
from optax_bema import _engine
from optax_bema import _schedule
from optax_bema import _tree

# The EMA weight never falls below this, however long training runs.
_DECAY_FLOOR = 1e-4

_RIGHT_SPELLING = (
    'PACE is the whole optimizer (AdamW plus the pullback), not a stabilizer '
    'to put after one: it needs the raw gradient, for its own Adam second '
    'moment, and the scheduled learning rate. Write it in place of '
    'optax.adamw, e.g. optax.chain(optax.clip_by_global_norm(1.0), '
    'optax_bema.pace(1e-3, pullback=0.15, ema_power=0.2)).')


class PaceGain(NamedTuple):
  """The scalars of the last step's gain lam = strength / (sqrt(nu / c) + eps).

  Kept so :func:`pace_telemetry` can rebuild the gain from ``nu`` on demand:
  reducing it inside the step would write parameter-sized temporaries on
  every step, several times the cost of the step itself on CPU.
  """
  strength: jax.Array       # lr_t * pullback * decay_t, float32
  nu_correction: jax.Array  # 1 - b2 ** t, Adam's bias correction of nu
  eps: jax.Array
  cap: jax.Array            # 1 with clip_pullback, else inf


class PaceState(NamedTuple):
  """State of :func:`pace`: AdamW's state, the EMA and scalars.

  Three parameter-sized copies: Adam's two moments, in the
  ``optax.ScaleByAdamState`` inside ``adamw``, and the EMA.
  """
  count: jax.Array  # type: ignore[assignment]  # steps taken, int32, saturating
  nonfinite_count: jax.Array   # EMA updates skipped for a non-finite iterate
  adamw: Any                   # optax.adamw's state (a chain's tuple)
  ema: optax.Params            # the model PACE returns
  last_ema_step: jax.Array     # the step of the last EMA update, int32
  gain: PaceGain               # what pace_telemetry needs of the last step


class PaceTelemetry(NamedTuple):
  """The paper's telemetry of PACE's last step."""
  clipped_fraction: jax.Array  # share of coordinates whose gain reached 1
  mean_gain: jax.Array         # mean per-coordinate gain lam (after clipping)


def pace_telemetry(opt_state) -> PaceTelemetry:
  """The share of clipped coordinates and the mean gain at PACE's last step.

  Computed from the state when asked (one pass over Adam's ``nu``), so the
  training step pays nothing for it; jit it with the step or log it every
  few hundred steps. ``opt_state`` may be any state holding one
  :class:`PaceState`.

  Examples:
    >>> import jax.numpy as jnp, optax_bema
    >>> tx = optax_bema.pace(1.0, pullback=1.0, ema_power=0.0)
    >>> params = jnp.zeros(2)
    >>> _, state = tx.update(jnp.array([4.0, 0.5]), tx.init(params), params)
    >>> float(optax_bema.pace_telemetry(state).clipped_fraction)
    0.5
  """
  state = _tree.find_state(
      opt_state, (PaceState,), caller='pace_telemetry', what='PaceState',
      missing='Train with optax_bema.pace(...).')
  raw_gain = jax.tree.map(
      lambda v: _gain(state.gain, v.astype(_tree.SCALAR_DTYPE)),
      _adam_nu(state.adamw))
  return PaceTelemetry(
      clipped_fraction=_mean_over_coordinates(
          jax.tree.map(lambda lam: lam >= 1, raw_gain)),
      mean_gain=_mean_over_coordinates(
          jax.tree.map(lambda lam: jnp.minimum(lam, state.gain.cap),
                       raw_gain)))


def pace(
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    pullback: float,
    ema_power: float,
    delay: float = 0.0,
    multiplier: float = 1.0,
    update_freq: int = 1,
    clip_pullback: bool = True,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    accumulator_dtype: Optional[jnp.dtype] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW that pulls its live weights toward their EMA, the model returned.

  Per coordinate, at step :math:`t` (from 1), with :math:`\eta_t` the
  scheduled learning rate (``learning_rate(t - 1)``, as in ``optax.adamw``),
  :math:`c` the pullback, :math:`\kappa` the EMA power, :math:`\gamma` the
  multiplier, :math:`\rho` the delay and :math:`\lambda` the weight decay:

  .. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
    D = \sqrt{v / (1-\beta_2^t)} + \epsilon \\
    \theta' &= \theta - \eta_t \left(\frac{m / (1-\beta_1^t)}{D}
      + \lambda \theta\right) \\
    \beta_t &= \max\left((1 + \gamma \max(0, t - \rho))^{-\kappa},
      10^{-4}\right), \quad
    \ell = \min\left(\frac{\eta_t c \beta_t}{D}, 1\right) \\
    \theta_t &= \theta' + \ell (\bar\theta - \theta) \\
    \bar\theta &\leftarrow (1 - \beta_t) \bar\theta + \beta_t \theta_t
    \quad \text{if } (t - t_{ema}) \bmod \phi = 0, \text{ then }
    t_{ema} = t,

  where :math:`\bar\theta` is the EMA from before this step's update (so the
  pullback is exactly zero at step 1, where :math:`\bar\theta = \theta_0`),
  :math:`\phi` is ``update_freq`` and :math:`t_{ema}` starts at 0. The
  pullback acts every step; only the EMA update is gated. The model to
  return is the EMA: ``optax_bema.averaged_params(opt_state, params)``.

  The gain :math:`\ell` is largest on coordinates with a small gradient
  scale :math:`D`, those Adam moves furthest per unit of gradient.
  :func:`pace_telemetry` reads from the state the share of coordinates where
  it reached 1 (the paper's main telemetry) and its mean; the step itself
  pays nothing for them.

  PACE is the whole optimizer, not a stabilizer to put after one: it must
  receive the raw gradient (for its own Adam moments) and the learning rate.
  Write it in place of ``optax.adamw``; only stateless gradient processing
  (``clip_by_global_norm``, ``zero_nans``, ...) may precede it in a chain,
  and gradient accumulation goes around it (``optax.MultiSteps``). The
  stabilizer-style spelling ``optax.chain(optax.adamw(lr),
  optax_bema.pace(pullback=..., ema_power=...))`` has no learning rate and
  fails at construction with ``TypeError``, showing the right spelling.

  No returned model is non-finite because one step was: an EMA update whose
  iterate has a non-finite element is skipped (counted in the state's
  ``nonfinite_count``), so the EMA keeps its last finite value. The live
  weights and Adam's moments are not protected by this; to skip a step with
  a non-finite gradient altogether, wrap the optimizer:
  ``optax.apply_if_finite(optax_bema.pace(...), max_consecutive_errors)``,
  whose state :func:`averaged_params` and :func:`pace_telemetry` read as
  they read PACE's own.

  Every argument after ``learning_rate`` is keyword-only: optax.adamw's
  fifth positional argument is ``eps_root``, PACE has none. Its
  ``weight_decay`` defaults to 0.01 (the PACE paper's), where
  ``optax.adamw``'s defaults to 1e-4. Its EMA weight (1 + gamma max(0, t -
  rho)) ** -kappa, floored at 1e-4, counts from the ``delay``; the
  stabilizers' weight (lag + multiplier t) ** -ema_power has an offset
  ``lag`` instead, and a floor ``min_ema_multiplier`` (0 by default). With
  ``delay=0``, PACE's equals the stabilizers' with ``lag=1``.

  Args:
    learning_rate: eta, a float or an optax schedule; required.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to Adam's denominator, outside the square root.
    weight_decay: lambda, decoupled and scaled by the scheduled learning rate.
    pullback: c >= 0, the pullback strength; 0 is AdamW with an EMA kept for
      evaluation, and then the iterates equal ``optax.adamw``'s exactly.
    ema_power: kappa >= 0, the power of the EMA weight.
    delay: rho >= 0, steps before the EMA weight starts to decay; until then
      it is 1 and the EMA follows the weights.
    multiplier: gamma >= 0, the step's factor in the EMA weight's base.
    update_freq: phi >= 1, the EMA is updated every ``update_freq`` steps.
    clip_pullback: whether to clip the gain at 1 (the paper's rule).
    mask: an optax-style mask (a pytree of bools, a prefix of it, or a
      callable of the params) of the leaves weight decay applies to.
    accumulator_dtype: dtype of the Adam moments and the EMA; by default
      float32 for bfloat16/float16 weights and the weights' own otherwise.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its update needs
    ``params`` and returns updates in the params' dtypes. Its state is a
    :class:`PaceState`, which holds ``optax.adamw``'s state (Adam's moments,
    float32 for bfloat16 weights) beside the EMA.

  Raises:
    TypeError: without a learning rate, or given a transform in its place.
    ValueError: for a NaN or infinite hyperparameter, negative
      ``pullback``, ``ema_power``, ``delay``, ``multiplier``,
      ``weight_decay``, ``eps`` or learning rate, betas outside [0, 1),
      ``update_freq`` not an integer >= 1; at the first update, without
      ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  optax_bema.pace(1e-2, pullback=0.15, ema_power=0.2))
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = {'w': params['w'] - 0.5}
    ...   updates, state = jax.jit(tx.update)(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> model = optax_bema.averaged_params(state, params)
    >>> telemetry = optax_bema.pace_telemetry(state)
    >>> model['w'].shape, float(telemetry.clipped_fraction)
    ((3,), 0.0)

  References:
    Au and Block, `Training for the Model You Return
    <https://arxiv.org/abs/2606.25086>`_, 2026.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  if learning_rate is None:
    raise TypeError('pace: missing the learning rate. ' + _RIGHT_SPELLING)
  if isinstance(learning_rate, optax.GradientTransformation):
    raise TypeError('pace: learning_rate is a transform, not a rate. '
                    + _RIGHT_SPELLING)
  _check_hyperparameters(
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
      weight_decay=weight_decay, pullback=pullback, ema_power=ema_power,
      delay=delay, multiplier=multiplier, update_freq=update_freq)
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                      mu_dtype=accumulator_dtype, weight_decay=weight_decay,
                      mask=mask)
  # The stabilizers' power law at t' = max(0, t - delay), with lag 1 and a
  # floor: (1 + multiplier t') ** -ema_power, never below 1e-4; its
  # update_freq counts from the last EMA update, not from the burn-in.
  ema_weight = _schedule.Schedule(ema_power=ema_power, lag=1.0,
                                  multiplier=multiplier,
                                  min_ema_multiplier=_DECAY_FLOOR,
                                  update_freq=update_freq)
  return _pull_toward_ema(
      adamw, learning_rate=learning_rate, b2=b2, eps=eps, pullback=pullback,
      ema_weight=ema_weight, delay=delay, clip_pullback=clip_pullback,
      accumulator_dtype=accumulator_dtype)


def _pull_toward_ema(adamw, *, learning_rate, b2, eps, pullback, ema_weight,
                     delay, clip_pullback, accumulator_dtype):
  """``adamw``'s step plus the pullback toward the EMA; the EMA's update.

  ``adamw`` is an Adam-family optimizer with decay ``b2`` and ``eps`` whose
  state holds an ``optax.ScaleByAdamState``: its ``nu`` gives the gradient
  scale D of the gain.
  """
  scalar = lambda v: jnp.asarray(v, _tree.SCALAR_DTYPE)
  cap = 1.0 if clip_pullback else float('inf')

  def init_fn(params):
    return PaceState(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        # Adam's moments take the dtype of what init is given: float32 for
        # bfloat16 weights.
        adamw=adamw.init(_tree.zeros_tree(params, accumulator_dtype)),
        ema=_tree.copy_tree(params, accumulator_dtype),
        last_ema_step=jnp.zeros([], jnp.int32),
        gain=PaceGain(*map(scalar, (0.0, 1.0, eps, cap))))

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    _tree.require_params(params, 'pace')
    t = optax.safe_increment(state.count)
    step, adamw_state = adamw.update(grads, state.adamw, params)
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    beta = ema_weight.beta(jnp.maximum(scalar(t) - delay, 0.0), jnp)
    gain = PaceGain(strength=scalar(lr) * scalar(pullback) * beta,
                    nu_correction=1 - scalar(b2) ** t,
                    eps=scalar(eps), cap=scalar(cap))

    def pulled(p, u, v, e):
      lam = jnp.minimum(_gain(gain, v), gain.cap.astype(v.dtype))
      return (u + lam * (e - p.astype(e.dtype))).astype(p.dtype)
    updates = jax.tree.map(pulled, params, step, _adam_nu(adamw_state),
                           state.ema)

    current = optax.apply_updates(params, updates)
    theta = _tree.as_accumulator(current, accumulator_dtype)
    # The live weights may go non-finite (a NaN gradient poisons Adam's
    # moments); the EMA, the model PACE returns, never takes such an iterate.
    due = jnp.asarray(True) if ema_weight.every_step else (
        (t - state.last_ema_step)
        % jnp.asarray(ema_weight.update_freq, t.dtype) == 0)
    ok, skipped = _engine.guard(due, current, accumulator_dtype)
    return updates, PaceState(
        count=t,
        nonfinite_count=state.nonfinite_count + skipped,
        adamw=adamw_state,
        ema=optax.tree.where(ok, _tree.ema_tree(beta, state.ema, theta),
                             state.ema),
        last_ema_step=jnp.where(ok, t, state.last_ema_step),
        gain=gain)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _gain(gain: PaceGain, nu):
  """The unclipped gain strength / D of one leaf, in ``nu``'s dtype."""
  dtype = nu.dtype
  scale = jnp.sqrt(nu / gain.nu_correction.astype(dtype))
  return gain.strength.astype(dtype) / (scale + gain.eps.astype(dtype))


def _adam_nu(adamw_state):
  """Adam's second moment, found in AdamW's state by its class's name."""
  return optax.tree.get(adamw_state, 'ScaleByAdamState').nu


def _check_hyperparameters(*, learning_rate, b1, b2, eps, weight_decay,
                           pullback, ema_power, delay, multiplier,
                           update_freq):
  for name, value in (('b1', b1), ('b2', b2)):
    _checks.check('pace', name, value, *_checks.DECAY)
  for name, value in (('learning_rate', learning_rate), ('eps', eps),
                      ('weight_decay', weight_decay), ('pullback', pullback),
                      ('delay', delay)):
    _checks.check('pace', name, value, *_checks.NONNEGATIVE)
  _checks.check_power_law('pace', power=ema_power, lag=1.0,
                          multiplier=multiplier)
  _checks.check_schedule('pace', update_after=0, update_freq=update_freq)


def _mean_over_coordinates(tree) -> jax.Array:
  return _tree.tree_sum(tree) / max(1, sum(x.size for x in
                                           jax.tree.leaves(tree)))
