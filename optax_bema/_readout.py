"""The model to return: :func:`averaged_params`, a plain table from state class
to readout (each kind's own, and PACE's)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from optax_bema import _kinds
from optax_bema import _pace
from optax_bema import _tree
from optax_bema._placement import to_device

# Each kind's readout, and PACE's: its EMA.
_READOUTS = {**_kinds.READOUTS,
             _pace.PaceState: lambda state, params: state.ema}


def averaged_params(opt_state, params, name=None):
  """The model to evaluate and return: the average an optimizer state holds.

  Finds the averaging state (EMA, BEMA, DEMA, OUEMA or PACE) anywhere
  inside ``opt_state`` -- a plain state, ``optax.chain``, ``named_chain``,
  ``MultiSteps``, ``inject_hyperparams``, ``apply_if_finite`` -- and reads
  its model out; with several (``optax_bema.averages``), ``name`` picks
  one. The model is always finite: the averages never take in a
  non-finite iterate, and BEMA with ``update_freq=1``, which reads the
  current params, returns its EMA when those are not finite.

  Args:
    opt_state: the optimizer state, or any part of it holding exactly one
      averaging state.
    params: the current weights. They give the model its dtypes, layout and
      non-float leaves; BEMA with ``update_freq=1`` also reads their values,
      to hold one parameter-sized copy fewer.
    name: which of several named averaging states to read: a member of
      ``optax_bema.averages`` or ``posthoc_ema``, or an element of
      ``optax.named_chain``; ``None`` when there is only one.

  Returns:
    A pytree with the structure, dtypes and shardings of ``params``.

  An average updated every few steps returns, until its first update, the
  weights it started from (theta_0, or the weights at the end of its
  burn-in): ``bema()`` updates every 400 steps, so read after 300 it is the
  untrained model. Read outside ``jit``, BEMA and OUEMA see it in their
  state and warn (:class:`NeverUpdatedWarning`, naming ``update_freq`` and
  ``update_after``); EMA's and DEMA's states cannot show it (DEMA's two
  EMAs stay equal after every update when beta_t = 1), and under ``jit``
  the values are unknown, so those return theta_0 without a word.
  :func:`choose` never picks such an average, and
  ``optax_bema.profile(tx, num_steps)`` shows where its weight lies.

  Raises:
    ValueError: when ``opt_state`` holds no averaging state (named
      ``name``), or several and no ``name`` picks one, or when ``params``
      differ from the average in tree structure or a leaf's shape.

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
  state = _tree.find_state(
      opt_state, _READOUTS, caller='averaged_params', what='averaging state',
      missing='Put a stabilizer last in the chain, e.g. optax.chain('
      'optax.adamw(lr), optax_bema.bema()), or use optax_bema.pace(...).',
      name=name)
  out = _tree.cast_like_params(model(state, params), params,
                               'averaged_params: the average')
  _warn_if_never_updated(state, out, params)
  return out


class NeverUpdatedWarning(UserWarning):
  """An average read before its first update: it holds the weights it
  started from, not an average."""


def _warn_if_never_updated(state, out, params):
  """Warns when ``state`` shows no update since init or its burn-in and its
  model is not the current weights (it is during a burn-in). Only where
  the values are known: outside ``jit``."""
  unmoved = _kinds.UNMOVED.get(type(state))
  if unmoved is None or any(isinstance(x, jax.core.Tracer)
                            for x in jax.tree.leaves((state, params))):
    return
  if not int(state.count):
    return
  state = to_device(state)  # an offloaded state is compared on the device
  if not unmoved(state) or _tree.tree_equal(out, params):
    return
  skipped = int(state.nonfinite_count)
  warnings.warn(
      f'averaged_params: at step {int(state.count)}, this '
      f'{_kinds.name_of(state)} average has not updated once since init or '
      'the end of its burn-in, so it returns the weights it started from, '
      'not an average'
      + (f' ({skipped} update step(s) skipped a non-finite iterate)'
         if skipped else '') + '. '
      'It updates every update_freq steps after update_after (bema(), '
      'ema(), dema() and ouema() default to update_freq=400): pass a '
      'smaller update_freq, e.g. update_freq=1, or a smaller update_after.',
      NeverUpdatedWarning, stacklevel=3)


def model(state, params):
  """The model of one averaging state, in its dtypes, float32 at least: a
  16-bit average's readout (BEMA's correction, DEMA's extrapolation) is
  computed in float32, not rounded to 16 bits on the way."""
  state = to_device(state)  # an offloaded state is read on the device
  wide = jax.tree.map(
      lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
      if _tree.is_float_leaf(x) and jnp.dtype(x.dtype).itemsize < 4 else x,
      state)
  return _READOUTS[type(state)](wide, params)
