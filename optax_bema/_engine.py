"""The engine every stabilizer runs on, written once.

The power-law weights, the update-step predicate (burn-in and
``update_freq``), the iterate theta_t = params + updates, the non-finite
guard, and where the state lives. A stabilizer contributes a :class:`Rule`:
its state class and a short sequence of named field updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_bema import _checks
from optax_bema import _tree
from optax_bema._placement import OnDevice
from optax_bema._placement import OnHost
from optax_bema._placement import like_sharding


def power_law(t, *, lag, multiplier, power, floor=None) -> jax.Array:
  """w(t) = max((lag + multiplier t) ** -power, floor), in float32."""
  t = jnp.asarray(t, _tree.SCALAR_DTYPE)
  base = (jnp.asarray(lag, _tree.SCALAR_DTYPE)
          + jnp.asarray(multiplier, _tree.SCALAR_DTYPE) * t)
  weight = base ** (-jnp.asarray(power, _tree.SCALAR_DTYPE))
  if floor is not None:
    weight = jnp.maximum(weight, jnp.asarray(floor, _tree.SCALAR_DTYPE))
  return weight


def is_update_step(t, *, update_after, update_freq) -> jax.Array:
  """t > update_after and (t - update_after) is a multiple of update_freq."""
  since = t - jnp.asarray(update_after, t.dtype)
  return (since > 0) & (since % jnp.asarray(update_freq, t.dtype) == 0)


class Weights(NamedTuple):
  """The scalars of step t, all float32."""
  t: jax.Array
  beta: jax.Array   # the EMA weight
  alpha: jax.Array  # the bias-correction weight


class Field(NamedTuple):
  """One field's update: ``name <- new(weights, theta_t, state)``.

  ``new=None`` sets the field to theta_t itself: its old value is never
  read, which lets an offloaded field stay where it is.
  """
  name: str
  new: Optional[Callable[[Weights, Any, Any], Any]] = None


class Rule(NamedTuple):
  """What one stabilizer adds to the engine.

  Attributes:
    name: the public name, for error messages.
    state_cls: its NamedTuple state: ``count``, ``nonfinite_count``, then its
      fields.
    averages: its parameter-sized fields; a burn-in step sets each to theta_t.
    update: the field updates of an update step, applied in order: each sees
      the state with the fields before it already updated (DEMA's second EMA
      averages the new first one).
    scalars: its scalar fields and their values at init and after a burn-in.
  """
  name: str
  state_cls: type
  averages: tuple[str, ...]
  update: tuple[Field, ...]
  scalars: tuple[tuple[str, float], ...] = ()


class Stabilizer(optax.GradientTransformationExtraArgs):
  """A stabilizer's transform, which also knows what it computes.

  Attributes (set at construction):
    kind: ``'ema'``, ``'bema'``, ``'dema'``, ``'ouema'`` (or ``'initial'``).
    update_given_finite: ``update`` with the iterate's non-finite test
      done once for several stabilizers (``optax_bema.averages``).
    hyperparams: the weight schedule's settings, by argument name; with them
      :func:`optax_bema.profile` gives the model's weights on the iterates.
  """


def stabilizer(rule: Rule, *, ema_power, bias_power, lag, multiplier,
               update_after, update_freq, min_ema_multiplier,
               accumulator_dtype, offload_to_host=False,
               bias_multiplier=None) -> Stabilizer:
  """The transform: schedule, predicate and guard around ``rule``.

  ``bias_multiplier`` (by default ``multiplier``) is gamma in the bias
  weight's base, alpha_t = (lag + bias_multiplier t) ** -bias_power.
  """
  if bias_multiplier is None:
    bias_multiplier = multiplier
  _checks.check(rule.name, 'bias_multiplier', bias_multiplier,
                *_checks.NONNEGATIVE)
  _checks.check_power_law(rule.name, power=ema_power, lag=lag,
                          multiplier=multiplier, floor=min_ema_multiplier)
  _checks.check(rule.name, 'bias_power', bias_power, *_checks.NONNEGATIVE,
                allow_inf=True)  # inf: no bias correction, i.e. EMA
  _checks.check_schedule(rule.name, update_after=update_after,
                         update_freq=update_freq)
  place = OnHost if offload_to_host else OnDevice
  # An update every step needs no branch: one fused, masked pass.
  every_step = _checks.is_static(update_freq) and update_freq == 1
  # Without a burn-in its branch would never be taken; don't build it.
  has_burn_in = not (_checks.is_static(update_after) and int(update_after) == 0)
  reset = tuple(Field(n) for n in rule.averages) + tuple(
      Field(n, lambda w, theta, s, v=v:  # type: ignore[misc]
            jnp.asarray(v, _tree.SCALAR_DTYPE))
      for n, v in rule.scalars)

  def init_fn(params):
    # Leaf by leaf: offloaded, the device never holds more than one extra.
    copy = lambda p: place.store(_tree.copy_tree(p, accumulator_dtype))
    return rule.state_cls(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        **{name: jax.tree.map(copy, params) for name in rule.averages},
        **{n: jnp.asarray(v, _tree.SCALAR_DTYPE) for n, v in rule.scalars})

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return update_given_finite(updates, state, params, None)

  def update_given_finite(updates, state, params, finite):
    """``update_fn``; ``finite``, if given, says whether theta_t (in the
    default accumulator dtype) is finite, so that several averages of one
    iterate test it once. It is used where this update runs every step."""
    _tree.require_params(params, rule.name)
    if accumulator_dtype is not None or not every_step:
      finite = None
    # A state that arrives elsewhere (e.g. restored from a checkpoint without
    # memory kinds) moves once; otherwise this is a no-op.
    state = state._replace(**place.store(
        {name: getattr(state, name) for name in rule.averages}))
    t = optax.safe_increment(state.count)
    in_burn_in = t <= jnp.asarray(update_after, t.dtype)
    due = is_update_step(t, update_after=update_after,
                         update_freq=update_freq)
    # theta_t in the params' dtypes: the very array optax.apply_updates
    # makes, so XLA computes it once. The branches cast it: a float32 copy of
    # bfloat16 params made out here would be written out on every step.
    current = optax.apply_updates(params, updates)

    shared_finite = finite

    def apply(state, fields, due):
      """The fields ``fields`` change where ``due`` and theta_t is finite."""
      if not fields:  # nothing to update (the theta_0 holder), nothing to guard
        return {}
      theta = jax.tree.map(
          like_sharding, _tree.as_accumulator(current, accumulator_dtype),
          getattr(state, rule.averages[0]))  # laid out as the state
      finite = (_tree.all_finite(theta) if shared_finite is None
                else shared_finite)
      ok = due & finite
      weights = Weights(
          t=jnp.asarray(t, _tree.SCALAR_DTYPE),
          beta=power_law(t, lag=lag, multiplier=multiplier, power=ema_power,
                         floor=min_ema_multiplier),
          alpha=power_law(t, lag=lag, multiplier=bias_multiplier,
                          power=bias_power))
      seen, changed = place.load(state), {}
      for name, new in fields:
        value = theta if new is None else new(weights, theta, seen)
        where = place if name in rule.averages else OnDevice
        changed[name], value = where.commit(
            ok, value, getattr(state, name), overwrites=new is None)
        # Later fields read the value kept (XLA then reads what it wrote
        # rather than keep the old value alive: a copy).
        seen = seen._replace(**{name: value})
      changed['nonfinite_count'] = (
          state.nonfinite_count + (due & ~finite).astype(jnp.int32))
      return changed

    def branch(state, fields, due):
      """``apply`` where ``due``; else the fields it would change, as they were.

      The branch returns only what it may change: a field passed through
      every branch unchanged (theta_0 on update steps) makes XLA copy it on
      every step.
      """
      names = list(jax.eval_shape(lambda s: apply(s, fields, due), state))
      return state._replace(**jax.lax.cond(
          due, lambda: apply(state, fields, due),
          lambda: {name: getattr(state, name) for name in names}))

    if has_burn_in:
      state = branch(state, reset, in_burn_in)
    if every_step:
      state = state._replace(**apply(state, rule.update, due))
    else:
      state = branch(state, rule.update, due)
    return updates, state._replace(count=t)

  transform = Stabilizer(init_fn, update_fn)
  transform.update_given_finite = update_given_finite
  transform.kind = rule.name
  transform.hyperparams = dict(
      ema_power=ema_power, bias_power=bias_power, lag=lag,
      multiplier=multiplier, update_after=update_after,
      update_freq=update_freq, min_ema_multiplier=min_ema_multiplier,
      bias_multiplier=bias_multiplier)
  return transform
