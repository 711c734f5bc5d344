"""The engine every stabilizer runs on, written once.

The iterate theta_t = params + updates, the burn-in, the update steps and
the weights (read from the stabilizer's ``_schedule.Schedule``), the
non-finite guard, and where the state lives. A stabilizer contributes a
:class:`Rule` (``_kinds``): its state class, a short sequence of named field
updates, its readout and its profile (its model as weights on the iterates,
``_profiles``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_bema import _checks
from optax_bema import _rounding
from optax_bema import _tree
from optax_bema._placement import OnDevice
from optax_bema._placement import OnHost
from optax_bema._placement import like_sharding
from optax_bema._schedule import SCALAR_DTYPE
from optax_bema._schedule import Schedule


class Weights(NamedTuple):
  """The scalars of step t, all float32, and the schedule they came from."""
  t: jax.Array
  beta: jax.Array   # the EMA weight
  alpha: jax.Array  # the bias-correction weight
  schedule: Schedule


def guard(due, iterate, accumulator_dtype, finite=None):
  """The non-finite guard: ``(ok, skipped)``.

  An update happens where ``ok``: it is due and the iterate theta_t is all
  finite in the ``accumulator_dtype`` (``finite``, if given, says so
  already), so an average never takes in a non-finite iterate; ``skipped``
  (int32, 0 or 1) counts a due update refused, for the state's
  ``nonfinite_count``. ``iterate`` is theta_t in the params' dtypes: the
  test reads it there where the cast changes no element's finiteness.
  """
  if finite is None:
    finite = _tree.all_finite(iterate, accumulator_dtype)
  return due & finite, (due & ~finite).astype(jnp.int32)


class Field(NamedTuple):
  """One field's update: ``name <- new(weights, theta_t, state)``.

  ``new=None`` sets the field to theta_t itself: its old value is never
  read, which lets an offloaded field stay where it is.
  """
  name: str
  new: Optional[Callable[[Weights, Any, Any], Any]] = None


class Rule(NamedTuple):
  """One kind of average: everything the library knows of it.

  Attributes:
    name: the public name (its factory's), for errors and saved states.
    state_cls: its NamedTuple state: ``count``, ``nonfinite_count``, then its
      fields.
    averages: its parameter-sized fields; a burn-in step sets each to theta_t.
    update: the field updates of an update step, applied in order: each sees
      the state with the fields before it already updated (DEMA's second EMA
      averages the new first one).
    readout: its model, ``readout(state, params)``, in the state's dtypes.
    profile: its model as weights on the iterates: a function of the
      schedule and the steps at which the model is wanted (``_profiles``).
    settings: the schedule's settings it reads; each must be a number.
    check: its own checks of a schedule beyond the family's, or None.
    scalars: its scalar fields and their values at init and after a burn-in.
    every_step: a leaner rule for the same kind when it updates every step,
      or None.
    deviation: the same kind with a 16-bit accumulator, updated every step:
      a state class of its own whose fields in ``deviations`` hold the
      average minus the params (``_rounding``), or None.
    deviations: the fields stored so, in a ``deviation`` rule.
    unmoved: ``unmoved(state)``, True where the state's values show it has
      had no update since init or its burn-in (its model is then the
      weights it started from), or None where they cannot show it.
  """
  name: str
  state_cls: type
  averages: tuple[str, ...]
  update: tuple[Field, ...]
  readout: Callable[[Any, Any], Any]
  profile: Callable[..., Any]
  settings: tuple[str, ...] = ('update_after', 'update_freq')
  check: Optional[Callable[[Schedule], None]] = None
  scalars: tuple[tuple[str, float], ...] = ()
  every_step: Optional['Rule'] = None
  deviation: Optional['Rule'] = None
  deviations: tuple[str, ...] = ()
  unmoved: Optional[Callable[[Any], Any]] = None


class Stabilizer(optax.GradientTransformationExtraArgs):
  """A stabilizer's transform, which also knows what it computes.

  Attributes (set at construction):
    rule: its :class:`Rule` (``rule.name`` is its kind: ``'ema'``, ...).
    schedule: its :class:`~optax_bema._schedule.Schedule`; with the rule's
      profile it gives the model's weights on the iterates.
    update_given_finite: ``update`` with the iterate's non-finite test
      done once for several stabilizers (``optax_bema.averages``).
  """

  @property
  def kind(self) -> str:
    return self.rule.name


def stabilizer(rule: Rule, schedule: Schedule, *, accumulator_dtype=None,
               offload_to_host=False) -> Stabilizer:
  """The transform: schedule, predicate and guard around ``rule``."""
  schedule.check(rule.name, rule.settings)
  if rule.check is not None:
    rule.check(schedule)
  # An update every step needs no branch: one fused, masked pass.
  every_step = schedule.every_step
  if every_step and rule.every_step is not None:
    rule = rule.every_step
  precision = storage(rule, schedule, accumulator_dtype)
  if precision.deviations and rule.deviation is not None:
    rule = rule.deviation
  place = OnHost if offload_to_host else OnDevice
  update_after = schedule.update_after
  # Without a burn-in its branch would never be taken; don't build it.
  has_burn_in = not (_checks.is_static(update_after) and update_after == 0)
  reset = tuple(Field(n) for n in rule.averages) + tuple(
      Field(n, lambda w, theta, s, v=v:  # type: ignore[misc]
            jnp.asarray(v, SCALAR_DTYPE))
      for n, v in rule.scalars)

  def init_fn(params):
    # Leaf by leaf: offloaded, the device never holds more than one extra.
    copy = lambda p: place.store(_tree.copy_tree(p, accumulator_dtype))
    # A deviation from theta_0, the params at init, starts at zero.
    zero = lambda p: place.store(_tree.zeros_tree(
        _tree.float_leaves(p), accumulator_dtype))
    return rule.state_cls(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        **{name: jax.tree.map(zero if name in rule.deviations else copy,
                              params) for name in rule.averages},
        **{n: jnp.asarray(v, SCALAR_DTYPE) for n, v in rule.scalars})

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return update_given_finite(updates, state, params, None)

  def update_given_finite(updates, state, params, finite):
    """``update_fn``; ``finite``, if given, says whether theta_t (in the
    default accumulator dtype) is finite, so that several averages of one
    iterate test it once. It is used where this update runs every step."""
    _tree.require_params(params, rule.name)
    if precision.guard_dtype is not None or not every_step:
      finite = None
    # A state that arrives elsewhere (e.g. restored from a checkpoint without
    # memory kinds) moves once; otherwise this is a no-op.
    state = state._replace(**place.store(
        {name: getattr(state, name) for name in rule.averages}))
    t = optax.safe_increment(state.count)
    in_burn_in = t <= jnp.asarray(update_after, t.dtype)
    due = schedule.is_update_step(t)
    # theta_t in the params' dtypes: the very array optax.apply_updates
    # makes, so XLA computes it once. The branches cast it: a float32 copy of
    # bfloat16 params made out here would be written out on every step.
    current = optax.apply_updates(params, updates)

    shared_finite = finite

    def apply(state, fields, due):
      """The fields ``fields`` change where ``due`` and theta_t is finite."""
      if not fields:  # nothing to update (the theta_0 holder), nothing to guard
        return {}
      iterate = jax.tree.map(
          like_sharding, _tree.float_leaves(current),
          getattr(state, rule.averages[0]))  # laid out as the state
      theta = precision.theta(iterate, params)
      ok, skipped = guard(due, iterate, precision.guard_dtype, shared_finite)
      time = jnp.asarray(t, SCALAR_DTYPE)
      weights = Weights(t=time, beta=schedule.beta(time, jnp),
                        alpha=schedule.alpha(time, jnp), schedule=schedule)
      loaded = place.load(state)
      seen, changed = precision.values(loaded, params), {}
      for name, new in fields:
        value = theta if new is None else new(weights, theta, seen)
        average = name in rule.averages
        if average:
          value = precision.store(name, value, theta=theta, iterate=iterate,
                                  old=getattr(loaded, name), step=t,
                                  copied=new is None)
        where = place if average else OnDevice
        # A deviation guards itself, element by element (``_rounding``).
        changed[name], value = where.commit(
            due if name in precision.deviations else ok, value,
            getattr(state, name), overwrites=new is None)
        # Later fields read the value kept (XLA then reads what it wrote
        # rather than keep the old value alive: a copy). Where it is not
        # kept, neither is theirs.
        seen = seen._replace(**{name: precision.value(name, value, theta)
                                if average else value})
      changed['nonfinite_count'] = state.nonfinite_count + skipped
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
  transform.rule = rule
  transform.schedule = schedule
  return transform


def storage(rule: Rule, schedule: Schedule, accumulator_dtype):
  """How ``rule``'s averages are stored (``_rounding``): as computed by
  default; 16-bit ones rounded stochastically, as deviations from the
  params where the kind has a deviation form and updates every step."""
  if not _rounding.is_low_precision(accumulator_dtype):
    return _rounding.Exact(accumulator_dtype)
  static = {k: v for k, v in schedule.settings().items()
            if _checks.is_static(v)}
  salt = _rounding.salt(f'{rule.name} {sorted(static.items())}')
  if schedule.every_step and rule.deviation is not None:
    return _rounding.Deviation(accumulator_dtype, rule.averages, salt,
                               rule.deviation.deviations)
  return _rounding.Rounded(accumulator_dtype, rule.averages, salt)
