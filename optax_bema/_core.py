"""The machinery every weight average shares, written once.

The power-law weight schedule, the update-step predicate (burn-in and
``update_freq``), the iterate tracking theta_t = params + updates, the
non-finite guard, and the readout registry behind :func:`averaged_params`.
Each stabilizer in ``_stabilizers.py`` contributes only its update rule.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_bema import _checks
from optax_bema._placement import like_sharding
from optax_bema._placement import to_device
from optax_bema._placement import to_host

# Scalars are computed in this precision; only the product meets the leaf dtype.
SCALAR_DTYPE = jnp.float32


def is_float_leaf(x) -> bool:
  """Whether a leaf is averaged: integer and boolean leaves never are."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def accumulator_dtype_for(leaf, accumulator_dtype) -> jnp.dtype:
  """float32 at least: bfloat16 and float16 weights are averaged in float32."""
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  return jnp.promote_types(leaf.dtype, SCALAR_DTYPE)


def copy_tree(params, accumulator_dtype):
  """A params-shaped copy in the accumulator dtype, one that never aliases.

  ``jnp.array(copy=True)`` keeps the leaf's sharding and yields a new buffer,
  so params and state can both be donated. Non-float leaves become
  ``optax.MaskedNode()``: they are never averaged and cost no memory.
  """
  def copy(p):
    if not is_float_leaf(p):
      return optax.MaskedNode()
    return jnp.array(p, dtype=accumulator_dtype_for(p, accumulator_dtype),
                     copy=True)
  return jax.tree.map(copy, params)


def zeros_tree(params, accumulator_dtype):
  """Params-shaped zeros in the accumulator dtype (optimizer moments)."""
  return jax.tree.map(
      lambda p: jnp.zeros_like(p, accumulator_dtype_for(p, accumulator_dtype)),
      params)


def ema_tree(beta, average, x):
  """(1 - beta) average + beta x per leaf, beta cast only at the end."""
  def step(a, v):
    b = beta.astype(a.dtype)
    return (1 - b) * a + b * v
  return jax.tree.map(step, average, x)


def tree_sum(tree) -> jax.Array:
  """The sum of every element of every leaf, accumulated in float32."""
  return sum((jnp.sum(x, dtype=SCALAR_DTYPE) for x in jax.tree.leaves(tree)),
             jnp.zeros([], SCALAR_DTYPE))


def iterate_tree(params, updates, accumulator_dtype):
  """theta_t = params + updates, rounded exactly as ``optax.apply_updates``."""
  return as_accumulator(optax.apply_updates(params, updates),
                        accumulator_dtype)


def as_accumulator(tree, accumulator_dtype):
  """Float leaves in the accumulator dtype; the others ``MaskedNode``."""
  def cast(x):
    if not is_float_leaf(x):
      return optax.MaskedNode()
    return x.astype(accumulator_dtype_for(x, accumulator_dtype))
  return jax.tree.map(cast, tree)


def all_finite(tree) -> jax.Array:
  """Whether every element of every leaf is finite, exactly.

  On accelerators, ``isfinite(x).all()``: XLA fuses the reduction into one
  read, and a ``lax.cond`` there would stall the host on every step. On CPU
  that form writes a boolean temporary and reduces it in a tree, 2-3 times
  slower than a sum, so there the sum decides: it is non-finite whenever an
  element is (NaN and infinities propagate through addition), and only then
  -- a non-finite element, or finite ones whose sum overflowed -- does the
  element-wise test run. (``max(abs(x))`` drops NaN on XLA:CPU's fast path.)
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)

  def elementwise(*xs):
    return jnp.stack([jnp.isfinite(x).all() for x in xs]).all()

  def summed(*xs):
    total = jnp.stack([
        jnp.sum(x, dtype=jnp.promote_types(x.dtype, SCALAR_DTYPE))
        for x in xs]).sum()
    return jax.lax.cond(jnp.isfinite(total), lambda *_: jnp.asarray(True),
                        elementwise, *xs)
  return jax.lax.platform_dependent(*leaves, cpu=summed, default=elementwise)


def require_params(params, name: str):
  if params is None:
    raise ValueError(
        f'{name}: update needs `params`, the current weights, to track '
        'theta_t = params + updates. Call tx.update(updates, state, params).')


def power_law(t, *, lag, multiplier, power, floor=None) -> jax.Array:
  """w(t) = max((lag + multiplier t) ** -power, floor), in float32."""
  t = jnp.asarray(t, SCALAR_DTYPE)
  base = (jnp.asarray(lag, SCALAR_DTYPE)
          + jnp.asarray(multiplier, SCALAR_DTYPE) * t)
  weight = base ** (-jnp.asarray(power, SCALAR_DTYPE))
  if floor is not None:
    weight = jnp.maximum(weight, jnp.asarray(floor, SCALAR_DTYPE))
  return weight


def is_update_step(t, *, update_after, update_freq) -> jax.Array:
  """t > update_after and (t - update_after) is a multiple of update_freq."""
  since = t - jnp.asarray(update_after, t.dtype)
  return (since > 0) & (since % jnp.asarray(update_freq, t.dtype) == 0)


# --- readout ---------------------------------------------------------------

_READOUTS: dict[type, Callable[[Any, Any], Any]] = {}


def register_readout(state_cls: type, readout: Callable[[Any, Any], Any]):
  """Declares ``readout(state, params) -> model`` for a state class."""
  _READOUTS[state_cls] = readout


def cast_like_params(model, params):
  """The model in the params' dtypes; non-float leaves are the params'."""
  def cast(p, m):
    if isinstance(m, optax.MaskedNode):
      return p
    return like_sharding(m.astype(p.dtype), p)
  return jax.tree.map(cast, params, model)


def find_state(opt_state, types, *, caller: str, what: str, missing: str):
  """The one state of a class in ``types`` anywhere inside ``opt_state``.

  Raises ``ValueError`` when there is none (``missing`` says what to do) or
  several (the message names their paths and how to pass one).
  """
  is_ours = lambda x: type(x) in types  # pylint: disable=unidiomatic-typecheck
  leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_ours)
  found = [(path, x) for path, x in leaves if is_ours(x)]
  if len(found) == 1:
    return found[0][1]
  if not found:
    raise ValueError(f'{caller}: opt_state holds no {what}. {missing}')
  where = ', '.join(f'opt_state{jax.tree_util.keystr(path)} '
                    f'({type(s).__name__})' for path, s in found)
  first = jax.tree_util.keystr(found[0][0])
  raise ValueError(
      f'{caller}: opt_state holds {len(found)} {what}s: {where}. Pass the '
      f'one to read, e.g. {caller}(opt_state{first}, ...).')


def averaged_params(opt_state, params):
  """The model to evaluate and return: the average an optimizer state holds.

  Finds the single averaging state (EMA, BEMA, DEMA, OUEMA or PACE) anywhere
  inside ``opt_state`` -- a plain state, ``optax.chain``, ``named_chain``,
  ``MultiSteps``, ``inject_hyperparams`` -- and reads its model out.

  Args:
    opt_state: the optimizer state, or any part of it holding exactly one
      averaging state.
    params: the current weights (BEMA with ``update_freq=1`` reads them to
      hold one parameter-sized copy fewer).

  Returns:
    A pytree with the structure, dtypes and shardings of ``params``.

  Raises:
    ValueError: when ``opt_state`` holds no averaging state, or several.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.ema(update_freq=1))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.ones(3), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> optax_bema.averaged_params(state, params).shape
    (3,)
  """
  state = find_state(
      opt_state, _READOUTS, caller='averaged_params', what='averaging state',
      missing='Put a stabilizer last in the chain, e.g. optax.chain('
      'optax.adamw(lr), optax_bema.bema()), or use optax_bema.pace(...).')
  state = to_device(state)  # an offloaded state is read on device
  return _READOUTS[type(state)](state, params)


# --- the shared transform --------------------------------------------------


class Weights(NamedTuple):
  """The scalars of step t, all float32."""
  t: jax.Array
  ema: jax.Array       # beta_t
  bias: jax.Array      # alpha_t


class Rule(NamedTuple):
  """What one stabilizer adds to the shared core.

  Attributes:
    name: the public name, for error messages.
    state_cls: its NamedTuple state; fields ``count``, ``nonfinite_count``,
      then its params-shaped averages in the order of ``averages``, then any
      scalar fields.
    averages: names of its params-shaped fields; a burn-in step resets each to
      theta_t.
    advance: ``advance(weights, theta, state) -> dict`` of the fields an
      update step changes (per leaf of theta, in the accumulator dtype). A
      value may be a function of the fields already updated, in the dict's
      order: XLA then reads what it wrote, rather than recompute it from the
      old field while overwriting that field, which costs it a copy.
    reset_scalars: values of the scalar fields after a burn-in reset.
  """
  name: str
  state_cls: type
  averages: tuple[str, ...]
  advance: Callable[[Weights, Any, Any], dict]
  reset_scalars: dict


def stabilizer(rule: Rule, *, ema_power, bias_power, lag, multiplier,
               update_after, update_freq, min_ema_multiplier,
               accumulator_dtype, offload_to_host=False,
               ) -> optax.GradientTransformationExtraArgs:
  """Builds the transform: schedule, predicate and guard around ``rule``.

  With ``offload_to_host`` the params-shaped fields (``rule.averages``) live
  in host memory and cross to the device only inside the update-step branch,
  as the BEMA paper does: steps between updates move nothing.
  """
  _checks.check_power_law(rule.name, power=ema_power, lag=lag,
                          multiplier=multiplier, floor=min_ema_multiplier)
  _checks.check(lambda v: v >= 0, bias_power,
                f'{rule.name}: bias_power must be >= 0, got {bias_power}.')
  _checks.check_schedule(rule.name, update_after=update_after,
                         update_freq=update_freq)
  # An update every step needs no branch: one fused pass over the state.
  every_step = _checks.is_static(update_freq) and int(update_freq) == 1

  def init_fn(params):
    copy = lambda p: copy_tree(p, accumulator_dtype)
    if offload_to_host:
      # Leaf by leaf: the device never holds more than one extra leaf.
      copy = lambda p: to_host(copy_tree(p, accumulator_dtype))
    fields = {name: jax.tree.map(copy, params) for name in rule.averages}
    return rule.state_cls(count=jnp.zeros([], jnp.int32),
                          nonfinite_count=jnp.zeros([], jnp.int32),
                          **fields, **_scalars(rule.reset_scalars))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    require_params(params, rule.name)
    if offload_to_host:
      # A state that arrives on the device (e.g. restored from a checkpoint
      # without memory kinds) goes to the host once; otherwise a no-op.
      state = state._replace(**to_host(
          {name: getattr(state, name) for name in rule.averages}))
    t = optax.safe_increment(state.count)
    in_burn_in = t <= jnp.asarray(update_after, t.dtype)
    scheduled = in_burn_in | is_update_step(
        t, update_after=update_after, update_freq=update_freq)

    # theta_t in the params' dtypes: the very array optax.apply_updates makes,
    # so XLA computes it once. Branches take it, and cast inside: given
    # `updates`, or a float32 copy of bfloat16 params, XLA would have to write
    # that out on every step, update or not.
    current = optax.apply_updates(params, updates)

    def iterate_like(state):
      # Laid out as the state, which may be sharded unlike the params.
      return jax.tree.map(like_sharding,
                          as_accumulator(current, accumulator_dtype),
                          getattr(state, rule.averages[0]))

    def step(state, burn_in: bool, due) -> dict:
      """The fields a burn-in reset or an update changes, masked by ``due``."""
      iterate = iterate_like(state)
      on_host = state
      if offload_to_host:
        # Unused transfers are dropped when jit lowers: only what the
        # update reads crosses (not BEMA's theta_0 or last iterate).
        state = to_device(state)
      finite = all_finite(iterate)
      weights = Weights(
          t=jnp.asarray(t, SCALAR_DTYPE),
          ema=power_law(t, lag=lag, multiplier=multiplier, power=ema_power,
                        floor=min_ema_multiplier),
          bias=power_law(t, lag=lag, multiplier=multiplier, power=bias_power))
      if burn_in:
        new = dict(_scalars(rule.reset_scalars),
                   **{name: iterate for name in rule.averages})
      else:
        new = rule.advance(weights, iterate, state)
      # Offloaded fields set to theta_t (BEMA's last iterate, any burn-in
      # reset) are written, never read: their guard keeps the old values on
      # the host, so they never cross to the device.
      overwritten = [n for n, v in new.items() if offload_to_host
                     and v is iterate]
      updated = {}
      for name, value in new.items():
        if name not in overwritten:
          updated[name] = optax.tree.where(
              due & finite, value(updated) if callable(value) else value,
              getattr(state, name))
      if overwritten:
        updated.update(jax.lax.cond(
            due & finite, lambda: to_host({n: iterate for n in overwritten}),
            lambda: {n: getattr(on_host, n) for n in overwritten}))
      new = updated
      if offload_to_host:
        new.update(to_host({name: new[name] for name in rule.averages
                            if name in new}))
      return dict(new, nonfinite_count=state.nonfinite_count
                  + (due & ~finite).astype(jnp.int32))

    def branch(state, burn_in: bool, due):
      """``step`` where ``due``, else what it would change, unchanged.

      The branch returns only what it may change: a field passed through
      every branch unchanged (theta_0 on update steps), or a branch inside a
      branch, makes XLA copy the field on every step.
      """
      changed = jax.eval_shape(lambda s: step(s, burn_in, due), state)
      return state._replace(**jax.lax.cond(
          due, lambda: step(state, burn_in, due),
          lambda: {name: getattr(state, name) for name in changed}))

    update = scheduled & ~in_burn_in
    if not (_checks.is_static(update_after) and int(update_after) == 0):
      state = branch(state, burn_in=True, due=in_burn_in)
    if every_step:
      # No branch: the update is one masked pass over what it changes.
      state = state._replace(**step(state, burn_in=False, due=update))
    else:
      state = branch(state, burn_in=False, due=update)
    return updates, state._replace(count=t)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scalars(values: dict) -> dict:
  return {k: jnp.asarray(v, SCALAR_DTYPE) for k, v in values.items()}
