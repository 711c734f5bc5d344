"""Where state lives: device or host memory, and the params' sharding.

The stabilizers' parameter-sized state may wait in host memory between update
steps (``offload_to_host``) and may be sharded unlike the params (ZeRO-style).
``OnDevice`` and ``OnHost`` are the two places, as one small strategy the
engine asks to store, load and commit a field; the helpers below move arrays
between the two memories and layouts.
"""

from __future__ import annotations

import jax
import optax


def in_host_memory(x) -> bool:
  return getattr(jax.typeof(x), 'memory_space', None) == jax.memory.Space.Host


def to_host(tree):
  """Moves the arrays of ``tree`` to host memory (``pinned_host``).

  Shardings are kept; only the memory kind changes. Works on concrete arrays
  and inside ``jit`` alike; arrays already there are left alone.
  """
  return jax.tree.map(
      lambda x: x if in_host_memory(x)
      else jax.device_put(x, jax.memory.Space.Host), tree)


def to_device(tree):
  """Moves the arrays of ``tree`` that live in host memory to the device."""
  return jax.tree.map(
      lambda x: jax.device_put(x, jax.memory.Space.Device)
      if in_host_memory(x) else x, tree)


def like_sharding(x, ref):
  """``x`` laid out as ``ref``, where the two are sharded differently.

  This lets a state be sharded unlike its params (ZeRO-style: the averages
  split over the data axis too). Explicit mesh axes make such a mismatch a
  type error, so ``x`` is resharded; concrete arrays are moved; inside
  ``jit`` under automatic axes XLA places ``x`` (``out_shardings`` decide).
  """
  if isinstance(x, jax.core.Tracer) or isinstance(ref, jax.core.Tracer):
    want = jax.typeof(ref).sharding
    if (jax.sharding.AxisType.Explicit in want.mesh.axis_types
        and want.spec != jax.typeof(x).sharding.spec):
      return jax.sharding.reshard(x, want)
    return x
  if (isinstance(getattr(ref, 'sharding', None), jax.sharding.NamedSharding)
      and x.sharding != ref.sharding):
    return jax.device_put(x, ref.sharding)
  return x


class OnDevice:
  """State that lives with the params: updated in place, by masking.

  An update that must not happen (a non-finite iterate) is a masked select,
  one fused pass with the update itself: no branch, no copy.
  """

  store = load = staticmethod(lambda tree: tree)

  @staticmethod
  def commit(ok, new, old, overwrites: bool):
    """``new`` where ``ok``, else ``old``: as stored, and as later fields of
    the same step read it."""
    del overwrites
    kept = optax.tree.where(ok, new, old)
    return kept, kept


class OnHost:
  """State in host memory (``pinned_host``) between update steps.

  It crosses to the device only where an update reads it (jit drops the
  transfers nobody reads) and goes back once updated. A field an update
  overwrites (with theta_t) goes back through a branch instead of a masked
  select, so its old value never crosses to the device at all.
  """

  store = staticmethod(to_host)
  load = staticmethod(to_device)

  @staticmethod
  def commit(ok, new, old, overwrites: bool):
    """``new`` where ``ok``, else ``old``: as stored, and as later fields of
    the same step read it (on the device)."""
    if overwrites:
      return jax.lax.cond(ok, lambda: to_host(new), lambda: old), new
    kept = optax.tree.where(ok, new, to_device(old))
    return to_host(kept), kept
