"""Several averages in one pass (:func:`averages`), and the record its saved
state keeps of each: which kind it is and its schedule, so that a snapshot
alone says what it holds, even restored without a target.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_bema import _engine
from optax_bema import _kinds
from optax_bema import _schedule
from optax_bema import _tree

# What a saved state's record of a member looks like; bump on any change.
# Format 2 adds ``"stored": "deviation"`` for a 16-bit average updated
# every step, held as its deviation from the params; others stay format 1.
FORMAT_VERSION = 1
DEVIATION_FORMAT = 2


class AveragesState(NamedTuple):
  """State of :func:`averages`: each member's state, and what it computes.

  ``settings[name]`` records the member as UTF-8 JSON bytes (a uint8
  array): ``{"format": 1, "kind": "ema", "settings": {"ema_power": 0.5,
  ...}}``, the member's kind and its schedule by name, so that a saved
  state alone says which average each member is (:func:`synthesize` reads
  it). Bytes, not floats: a checkpoint cast to bfloat16 keeps them exact.
  """
  members: dict
  settings: dict


def encode(member: _engine.Stabilizer) -> jax.Array:
  """The record of a member, as saved in :class:`AveragesState`."""
  record = dict(format=FORMAT_VERSION, kind=member.kind,
                settings=member.schedule.record())
  if member.rule.deviations:
    record.update(format=DEVIATION_FORMAT, stored='deviation')
  text = json.dumps(record, sort_keys=True)
  return jnp.asarray(np.frombuffer(text.encode(), np.uint8))


def decode(record, where: str) -> tuple[_engine.Rule, _schedule.Schedule]:
  """The rule and schedule a saved record names; ``ValueError`` if the
  record is not one this version can read exactly."""
  raw = np.asarray(record)
  try:
    if raw.ndim != 1 or not np.array_equal(raw, np.round(raw)):
      raise ValueError('not whole bytes')
    data = json.loads(bytes(raw.astype(np.uint8)).decode())
    version, kind = data['format'], data['kind']
    settings = data['settings']
    deviation = data.get('stored') == 'deviation'

  except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
    raise ValueError(
        f'{where}: the saved record of this average cannot be read ({e}); '
        'it was not written by optax_bema.averages, or was altered (e.g. '
        'cast to another dtype as floats).') from None
  known = {FORMAT_VERSION: False, DEVIATION_FORMAT: True}
  if known.get(version) != deviation or kind not in _kinds.RULES:
    raise ValueError(
        f'{where}: a record of format {version!r}, kind {kind!r}; this '
        f'version of optax_bema reads formats {sorted(known)} of the kinds '
        f'{sorted(_kinds.RULES)}. Upgrade optax_bema to read it.')
  rule = _kinds.RULES[kind]
  if deviation:
    rule = (rule.every_step or rule).deviation
    if rule is None:
      raise ValueError(f'{where}: a {kind} record stored as a deviation, '
                       'which this kind never is.')
  return rule, _schedule.from_settings(settings)


def averages(**members: _engine.Stabilizer
             ) -> optax.GradientTransformationExtraArgs:
  """Several named stabilizers in one transform, all fed the same iterate.

  Goes last in the chain, like one stabilizer; each member sees exactly what
  it would see alone, and the iterate theta_t = params + updates is the same
  array for all (XLA computes it, and the non-finite test, once). Read a
  member with ``optax_bema.averaged_params(opt_state, params, name=...)``.

  Args:
    **members: the stabilizers by name, e.g. ``ema=optax_bema.ema(...)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update returns its
    input updates unchanged; its state is an :class:`AveragesState`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_bema
    >>> tx = optax.chain(optax.sgd(0.1), optax_bema.averages(
    ...     ema=optax_bema.ema(update_freq=1),
    ...     bema=optax_bema.bema(update_freq=1)))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.ones(3), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> optax_bema.averaged_params(state, params, name='bema').shape
    (3,)
  """
  if not members:
    raise ValueError('averages: give at least one stabilizer, e.g. '
                     'averages(ema=optax_bema.ema()).')
  for name, member in members.items():
    _kinds.require_stabilizer(member, 'averages', f'member {name!r}')
  records = {k: encode(m) for k, m in members.items()}

  def init_fn(params):
    return AveragesState(
        members={k: m.init(params) for k, m in members.items()},
        settings={k: jnp.array(r) for k, r in records.items()})

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _tree.require_params(params, 'averages')
    # One test of theta_t for every member that updates on every step.
    finite = _tree.all_finite(optax.apply_updates(params, updates))
    return updates, state._replace(members={
        k: m.update_given_finite(updates, state.members[k], params, finite)[1]
        for k, m in members.items()})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def is_averages(x) -> bool:
  return isinstance(x, AveragesState) or (
      isinstance(x, dict) and set(x) == set(AveragesState._fields))


def tracked(opt_state, caller: str) -> dict:
  """``{name: (rule, schedule, state)}`` of the one averages state a
  snapshot holds, restored with or without a target."""
  leaves = jax.tree.leaves(opt_state, is_leaf=is_averages)
  found = [x for x in leaves if is_averages(x)]
  if len(found) != 1:
    holds = 'no averages state' if not found else (
        f'{len(found)} averages states')
    raise ValueError(
        f'{caller}: a snapshot\'s optimizer state holds {holds}; it must '
        'hold one. Train with optax_bema.posthoc_ema() (or '
        'optax_bema.averages(...)) last in the chain, and save the '
        'optimizer state, or just that state, with the params.')
  state = found[0]
  if not isinstance(state, AveragesState):  # restored without a target
    state = AveragesState(**state)
  members, settings = state.members, state.settings
  out = {}
  for name, record in settings.items():
    rule, schedule = decode(record, f'{caller}: member {name!r}')
    member = members[name]
    if isinstance(member, dict):  # restored without a target
      fields = rule.state_cls._fields  # type: ignore[attr-defined]
      member = rule.state_cls(**{f: member.get(f) for f in fields})
    out[name] = (rule, schedule, member)
  return out
