"""The kinds of average: each one :class:`~optax_bema._engine.Rule`.

A kind's rule is everything the library knows of it: its state, the named
field updates of an update step, its readout (the model it returns), its
profile (that model as weights on the iterates), the settings it reads and
its own checks. The engine runs it, :func:`~optax_bema.averaged_params`
reads it, replay and synthesis weigh it, a saved state names it; each of
those looks it up in :data:`RULES` and nowhere else.

Adding a kind: its state class, its ``Rule`` here (field updates, readout,
a profile function in ``_profiles`` in segment form), one entry in
``RULES``, and its factory with its docstring in ``_stabilizers``. A new
family of weights is one branch of ``Schedule.beta``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _checks
from optax_bema import _engine
from optax_bema import _profiles
from optax_bema import _rounding
from optax_bema import _tree
from optax_bema._placement import like_sharding


class EmaState(NamedTuple):
  """State of :func:`~optax_bema.ema` (and of
  :func:`~optax_bema.power_ema`): one parameter-sized copy of the weights.

  Not ``optax.EmaState``: ``optax.ema`` averages the *updates* (a momentum
  for the optimizer); this state holds an average of the *weights*.
  """
  count: jax.Array  # type: ignore[assignment]  # steps seen, int32, saturating
  nonfinite_count: jax.Array  # update steps skipped for a non-finite iterate
  ema: optax.Params


class BemaState(NamedTuple):
  """State of :func:`~optax_bema.bema`.

  ``last_iterate`` is theta at the last update step; it is ``None`` when
  ``update_freq=1``, where the current params are that iterate.
  """
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  nonfinite_count: jax.Array
  initial_params: optax.Params       # theta_0
  ema: optax.Params
  bias_weight: jax.Array             # alpha at the last update step
  last_iterate: Optional[optax.Params] = None


class DemaState(NamedTuple):
  """State of :func:`~optax_bema.dema`: two parameter-sized copies."""
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  nonfinite_count: jax.Array
  ema: optax.Params
  ema_of_ema: optax.Params


class OuemaState(NamedTuple):
  """State of :func:`~optax_bema.ouema`: two parameter-sized copies."""
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  nonfinite_count: jax.Array
  initial_params: optax.Params  # theta_0
  ema: optax.Params


class InitialState(NamedTuple):
  """State of the theta_0 holder inside :func:`optax_bema.posthoc_ema`."""
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  nonfinite_count: jax.Array
  initial_params: optax.Params  # theta_0 (the last burn-in step's weights)


# A 16-bit average updated every step holds its deviation from the params
# (``_rounding``); its state class says so, so a saved state is never read
# as values.
class EmaDeviationState(EmaState):
  """:class:`EmaState` of a 16-bit average updated every step: ``ema``
  holds the average minus the params."""
  __slots__ = ()


class BemaDeviationState(BemaState):
  """:class:`BemaState` of a 16-bit average updated every step: ``ema``
  holds the EMA minus the params."""
  __slots__ = ()


class DemaDeviationState(DemaState):
  """:class:`DemaState` of 16-bit averages updated every step: ``ema``
  and ``ema_of_ema`` hold each average minus the params."""
  __slots__ = ()


class OuemaDeviationState(OuemaState):
  """:class:`OuemaState` of a 16-bit average updated every step: ``ema``
  holds the average minus the params."""
  __slots__ = ()


def _deviation(rule, state_cls, deviations=('ema',)):
  """``rule`` with its averages in ``deviations`` stored as deviations from
  the params: read back as ``params + deviation``."""
  def readout(state, params):
    return rule.readout(_rounding.with_values(state, deviations, params),
                        params)
  return rule._replace(deviation=rule._replace(
      state_cls=state_cls, readout=readout, deviations=deviations,
      unmoved=None))  # updated every step: it moves from the first step


def _ema_field(name='ema', source=None) -> _engine.Field:
  """``name <- (1 - beta) name + beta x``, x theta_t or another field."""
  def new(w, theta, s):
    x = theta if source is None else getattr(s, source)
    return _tree.ema_tree(w.beta, getattr(s, name), x)
  return _engine.Field(name, new)


def _debiased_ema(w, theta, s):
  """OUEMA's field: the EMA of (theta_t - p_t theta_0) / (1 - p_t)."""
  p = w.schedule.ou_weight(w.t, jnp)
  x = jax.tree.map(
      lambda x, x0: (x - p.astype(x.dtype) * x0) / (1 - p.astype(x.dtype)),
      theta, s.initial_params)
  return _tree.ema_tree(w.beta, s.ema, x)


def _bema_readout(state, params):
  """alpha (theta - theta_0) + ema, theta from the last update step.

  With ``update_freq=1`` theta is the current params; when those are not all
  finite (training diverged) the correction is dropped and the EMA, finite
  by the engine's guard, is returned.
  """
  anchor = state.last_iterate
  if anchor is None:
    current = jax.tree.map(
        lambda p, e: e if isinstance(e, optax.MaskedNode)
        else like_sharding(jnp.asarray(p, e.dtype), e), params, state.ema)
    anchor = optax.tree.where(_tree.all_finite(current), current,
                              state.initial_params)
  return jax.tree.map(
      lambda x, x0, e: state.bias_weight.astype(e.dtype) * (x - x0) + e,
      anchor, state.initial_params, state.ema)


def _ouema_check(schedule):
  for name in ('bias_power', 'bias_multiplier'):
    _checks.check('ouema', name, getattr(schedule, name), lambda v: v > 0,
                  'be > 0 (p_t = (1 + bias_multiplier t) ** -bias_power '
                  'must stay below 1)')
  # p_t is largest at the first update step; in float32 (the step's
  # precision) 1 - p_t must stay above 0, or 1 / (1 - p_t) is infinite.
  p = _checks.float32_weight(schedule, lambda t, f: (
      f(1) + f(schedule.bias_multiplier) * t) ** -f(schedule.bias_power))
  if p is not None and not p < 1:
    raise ValueError(
        f'ouema: bias_multiplier={schedule.bias_multiplier} and bias_power='
        f'{schedule.bias_power} give p_t = {p} at the first update step in '
        'float32, so 1 / (1 - p_t) is infinite; raise bias_multiplier.')


def _bema_check(schedule):
  # alpha_t is largest at the first update step (its base grows with t).
  alpha = _checks.float32_weight(schedule, lambda t, f: (
      f(schedule.lag) + f(schedule.bias_multiplier) * t)
      ** -f(schedule.bias_power))
  if alpha is not None and not np.isfinite(alpha):
    raise ValueError(
        f'bema: lag={schedule.lag}, bias_multiplier='
        f'{schedule.bias_multiplier} and bias_power={schedule.bias_power} '
        f'give the bias weight alpha_t = (lag + bias_multiplier t) ** '
        f'-bias_power = {alpha} at the first update step in float32; raise '
        'lag or bias_multiplier.')


# What shows, in each kind's state, that it has not updated since init or
# its burn-in: every field is theta_0 there, and one update moves them
# apart. BEMA's bias weight is 0 until its first update (and after it only
# with alpha_t = 0, BEMA as EMA, whose EMA then leaves theta_0); OUEMA's
# EMA leaves theta_0. EMA's one copy cannot show it, nor DEMA's two EMAs:
# they also stay equal, at the last update's iterate, when beta_t = 1.
def _bema_unmoved(state) -> bool:
  return not float(state.bias_weight) and _tree.tree_equal(
      state.ema, state.initial_params)


def _ouema_unmoved(state) -> bool:
  return _tree.tree_equal(state.ema, state.initial_params)


_STEPS = ('update_after', 'update_freq')
_POWER_LAW = _STEPS + ('ema_power', 'lag', 'multiplier', 'min_ema_multiplier')
_BIAS = _POWER_LAW + ('bias_power', 'bias_multiplier')

EMA = _deviation(_engine.Rule(
    name='ema', state_cls=EmaState, averages=('ema',),
    update=(_ema_field(),), readout=lambda state, params: state.ema,
    profile=_profiles.ema, settings=_POWER_LAW), EmaDeviationState)
# EDM2's power-function EMA: EMA's state, update and readout, with
# power-function weights.
POWER_EMA = _deviation(EMA._replace(name='power_ema',
                                   settings=_STEPS + ('std',)),
                      EmaDeviationState)
DEMA = _deviation(_engine.Rule(
    name='dema', state_cls=DemaState, averages=('ema', 'ema_of_ema'),
    update=(_ema_field(), _ema_field('ema_of_ema', source='ema')),
    readout=lambda state, params: jax.tree.map(
        lambda e1, e2: 2 * e1 - e2, state.ema, state.ema_of_ema),
    profile=_profiles.dema, settings=_POWER_LAW),
    DemaDeviationState, ('ema', 'ema_of_ema'))
OUEMA = _deviation(_engine.Rule(
    name='ouema', state_cls=OuemaState, averages=('initial_params', 'ema'),
    update=(_engine.Field('ema', _debiased_ema),),
    readout=lambda state, params: state.ema, profile=_profiles.ouema,
    settings=_BIAS, check=_ouema_check, unmoved=_ouema_unmoved),
    OuemaDeviationState)
# BEMA keeps theta at the last update step, unless it updates every step:
# then the current params are that theta, and it holds one copy fewer.
_BEMA_EVERY_STEP = _deviation(_engine.Rule(
    name='bema', state_cls=BemaState, averages=('initial_params', 'ema'),
    update=(_ema_field(),
            _engine.Field('bias_weight', lambda w, theta, s: w.alpha)),
    readout=_bema_readout, profile=_profiles.bema, settings=_BIAS,
    check=_bema_check, scalars=(('bias_weight', 0.0),),
    unmoved=_bema_unmoved), BemaDeviationState)
BEMA = _BEMA_EVERY_STEP._replace(
    averages=_BEMA_EVERY_STEP.averages + ('last_iterate',),
    update=_BEMA_EVERY_STEP.update + (_engine.Field('last_iterate'),),
    every_step=_BEMA_EVERY_STEP, deviation=None)
# theta_0 alone: what posthoc_ema keeps beside its EMAs.
INITIAL = _engine.Rule(
    name='initial', state_cls=InitialState, averages=('initial_params',),
    update=(), readout=lambda state, params: state.initial_params,
    profile=_profiles.initial)

# Every kind, by name: the public ones (each an ``optax_bema`` factory of
# that name) and the theta_0 holder a saved posthoc_ema state names.
RULES = {r.name: r for r in (EMA, BEMA, DEMA, OUEMA, POWER_EMA, INITIAL)}
PUBLIC = tuple(name for name in RULES if name != INITIAL.name)
# The readout of each state class, for averaged_params.
VARIANTS = tuple(v for r in RULES.values()
                 for v in (r, r.every_step, r.deviation,
                           r.every_step and r.every_step.deviation) if v)
READOUTS = {r.state_cls: r.readout for r in reversed(VARIANTS)}
# Where a state class's values can show it never updated (see Rule.unmoved).
UNMOVED = {r.state_cls: r.unmoved for r in reversed(VARIANTS) if r.unmoved}
_NAMES = {r.state_cls: r.name for r in reversed(VARIANTS)}


def name_of(state) -> str:
  """The kind whose state ``state`` is ('ema' for power_ema's too)."""
  return _NAMES[type(state)]


def require_stabilizer(transform, caller: str, what: str):
  """``TypeError`` unless ``transform`` is a stabilizer built from numbers."""
  if not isinstance(transform, _engine.Stabilizer):
    raise TypeError(
        f'{caller}: {what} must be a stabilizer (optax_bema.'
        f'{", ".join(PUBLIC)}) or a profile (a NumPy array of weights), got '
        f'{type(transform).__name__}. PACE changes training, so it has no '
        'profile; optax.inject_hyperparams hides the settings.')
  if not all(isinstance(v, (int, float, np.number))
             for v in transform.schedule.settings().values()):
    raise TypeError(f'{caller}: {what} has array-valued settings; build it '
                    'with numbers.')
