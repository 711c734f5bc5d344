"""How an average is stored: as computed, rounded stochastically, or as its
deviation from the params.

A 16-bit average (``accumulator_dtype=jnp.bfloat16`` or ``float16``)
rounded to nearest stops moving once ``beta_t |theta_t - ema|`` falls under
half a unit in its last place: every update then rounds back to the same
value. So a 16-bit average is computed in float32 and rounded
stochastically, up or down with the probabilities that make the rounding
exact on average (Croci et al., "Stochastic rounding: implementation, error
analysis and applications", R. Soc. Open Sci. 2022): for bfloat16, uniform
random bits are added below its mantissa (the low 16 bits of the float32
pattern) and truncated. The bits are a hash of the step, the leaf, the
element's index in the full array, the field and the average's settings:
no key to carry, a resumed run draws the same bits, and every host of a
multi-host run the same for the same element.

An average updated every step is stored as its deviation from the current
params, ``ema - theta_t``: the update sees theta_t and the readout takes
the params, so the value is ``theta_t + deviation``, and the rounding error
is relative to the lag ``|ema - theta_t|``, not to ``|theta_t|``. With u_t
the update taking theta_t to theta_{t+1}, ``ema_{t+1} - theta_{t+1} = (1 -
beta) (ema_t - theta_t - u_t)``. Stored by value, unbiased errors of half an
ulp of the weights would pile up over the average's window. An average
updated every few steps reads theta only on its update steps, so it is
stored by value, rounded stochastically. Fields copied rather than
averaged (theta_0, BEMA's last iterate) are rounded to nearest.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import optax

from optax_bema._placement import like_sharding
from optax_bema._tree import as_accumulator

COMPUTE_DTYPE = jnp.float32


def is_low_precision(dtype) -> bool:
  """Whether an average stored in ``dtype`` needs stochastic rounding: a
  float of fewer than 32 bits (None, the default, never is)."""
  return (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
          and jnp.dtype(dtype).itemsize < 4)


def salt(text: str) -> int:
  """A 32-bit constant for an average, from its settings: two averages of
  one iterate draw different bits."""
  return zlib.crc32(text.encode())


def _mix(x):
  """A 32-bit integer hash (Wellons' lowbias32): each output bit depends
  on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def random_bits(shape, seed) -> jax.Array:
  """uint32 bits, one per element, a hash of ``seed`` and the element's
  index in the full array (so a sharded array draws what it would whole)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(
        jnp.uint32, shape, dim) * jnp.uint32(stride % 2 ** 32)
    stride *= shape[dim]
  return _mix(index * jnp.uint32(0x9E3779B9) + seed)


def seed(salt_value: int, step, *indices) -> jax.Array:
  """The uint32 seed of one step's rounding of one leaf of one field."""
  out = _mix(jnp.uint32(salt_value) ^ jnp.asarray(step).astype(jnp.uint32))
  for i in indices:
    out = _mix(out + jnp.uint32(i))
  return out


def round_stochastically(x, dtype, seed_value) -> jax.Array:
  """``x`` (float32) in ``dtype``, rounded up or down with probabilities
  that make ``E[result] = x``."""
  dtype = jnp.dtype(dtype)
  x = x.astype(COMPUTE_DTYPE)
  bits = random_bits(x.shape, seed_value)
  if dtype == jnp.bfloat16:
    # bfloat16 is float32's upper half: add random low bits, truncate.
    pattern = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (pattern + (bits >> 16)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, COMPUTE_DTYPE).astype(dtype)
  # Other dtypes: the nearest value, or its neighbour on x's other side with
  # probability (distance to the nearest) / (distance between the two).
  near = x.astype(dtype)
  error = x - near.astype(COMPUTE_DTYPE)
  away = jnp.nextafter(near, jnp.where(error > 0, jnp.inf, -jnp.inf).astype(
      dtype))
  gap = away.astype(COMPUTE_DTYPE) - near.astype(COMPUTE_DTYPE)
  uniform = (bits >> 8).astype(COMPUTE_DTYPE) * COMPUTE_DTYPE(2.0 ** -24)
  return jnp.where(jnp.abs(uniform * gap) < jnp.abs(error), away, near)


def _leaves_map(fn, *trees):
  """``fn(index, *leaves)`` over float leaves; ``MaskedNode`` stays."""
  flat = [jax.tree.leaves(t, is_leaf=_masked) for t in trees]
  out = [x if _masked(x) else fn(i, x, *rest)
         for i, (x, *rest) in enumerate(zip(*flat))]
  return jax.tree.unflatten(
      jax.tree.structure(trees[0], is_leaf=_masked), out)


def _masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype an average stored in ``dtype`` is computed in."""
  return jnp.promote_types(dtype, COMPUTE_DTYPE)


class Exact:
  """An average stored as computed, in its accumulator dtype (float32 or
  wider): the library's default, untouched."""

  deviations: tuple[str, ...] = ()

  def __init__(self, accumulator_dtype):
    self.accumulator_dtype = accumulator_dtype
    # The dtype in which theta_t must be finite for an update (None: its
    # own, or float32 for 16-bit weights). bfloat16 has float32's range.
    self.guard_dtype = (None if accumulator_dtype is not None and jnp.dtype(
        accumulator_dtype) == jnp.bfloat16 else accumulator_dtype)

  def theta(self, iterate, params):
    del params
    return as_accumulator(iterate, self.accumulator_dtype)

  def values(self, state, params):
    del params
    return state

  def value(self, name, stored, theta):
    del name, theta
    return stored

  def store(self, name, value, *, theta, iterate, old, step, copied):
    """The field ``name`` as stored, for its new ``value`` (computed with
    ``theta``); ``iterate`` is theta_t as it is, ``old`` the field now."""
    del name, theta, iterate, old, step, copied
    return value


class Rounded(Exact):
  """A 16-bit average, computed in float32 and rounded stochastically; a
  copied field (theta_0, BEMA's last iterate) is rounded to nearest."""

  def __init__(self, accumulator_dtype, fields, salt_value):
    super().__init__(accumulator_dtype)
    self.fields, self.salt = tuple(fields), salt_value

  def theta(self, iterate, params):
    del params
    return as_accumulator(iterate, None)  # float32 at least

  def values(self, state, params):
    del params
    return state._replace(**{n: _widen(getattr(state, n))
                             for n in self.fields})

  def value(self, name, stored, theta):
    del name, theta
    return _widen(stored)

  def store(self, name, value, *, theta, iterate, old, step, copied):
    """An element whose rounding overflows (bfloat16 tops out just below
    float32's largest values) keeps its old value."""
    del theta
    dtype = self.accumulator_dtype
    if copied:
      return jax.tree.map(lambda x: x.astype(dtype), iterate)
    field = self.fields.index(name)
    return _leaves_map(lambda i, x, d: _finite_or(round_stochastically(
        x, dtype, seed(self.salt, step, field, i)), d), value, old)


class Deviation(Rounded):
  """A 16-bit average updated every step, stored as its deviation from the
  params (the fields in ``deviations``); the others as :class:`Rounded`.

  The update is computed with theta_{t-1}, the params it is given, as the
  origin: theta_t is then u_t = theta_t - theta_{t-1}, an average
  ``params + deviation`` its deviation, and theta_0 ``theta_0 - params``
  (each update is an affine combination, so the origin does not change
  it). The new deviation is the new value less u_t.
  """

  def __init__(self, accumulator_dtype, fields, salt_value, deviations):
    super().__init__(accumulator_dtype, fields, salt_value)
    self.deviations = tuple(deviations)

  def theta(self, iterate, params):
    return _leaves_map(lambda i, x, p: _wide(x) - _wide(p), iterate, params)

  def values(self, state, params):
    return state._replace(**{
        n: _widen(getattr(state, n)) if n in self.deviations
        else _leaves_map(lambda i, x, p: _wide(x) - _wide(p),
                         getattr(state, n), params) for n in self.fields})

  def value(self, name, stored, theta):
    # Only an average a later field reads (DEMA's first) is asked for.
    return _add(theta, stored)

  def store(self, name, value, *, theta, iterate, old, step, copied):
    """A deviation is kept element by element where the new one is finite:
    no reduction over theta_t gates it, so the step reads the old params
    before it overwrites them, and needs no copy of them."""
    if name not in self.deviations:
      return super().store(name, value, theta=theta, iterate=iterate,
                            old=old, step=step, copied=copied)
    dtype = self.accumulator_dtype
    if copied:  # the average set to theta_t: no deviation
      return jax.tree.map(lambda x: jnp.zeros_like(x, dtype), old)
    field = self.fields.index(name)
    return _leaves_map(lambda i, v, u, d: _finite_or(round_stochastically(
        v - u, dtype, seed(self.salt, step, field, i)), d), value, theta, old)


def _finite_or(new, old):
  return jnp.where(jnp.isfinite(new), new, old)


def _wide(x):
  return x.astype(compute_dtype(x.dtype))


def _widen(tree):
  return jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), tree)


def _add(base, deviation):
  """``base + deviation`` per float leaf, in float32 at least, laid out as
  the deviation."""
  def add(i, d, p):
    del i
    wide = compute_dtype(jnp.promote_types(d.dtype, jnp.result_type(p)))
    return like_sharding(jnp.asarray(p, wide), d) + d.astype(wide)
  return _leaves_map(add, deviation, base)


def with_values(state, deviations, params):
  """``state`` with each field in ``deviations`` (the average minus the
  params) replaced by the average itself, ``params + deviation``."""
  return state._replace(**{n: _add(params, getattr(state, n))
                           for n in deviations})

