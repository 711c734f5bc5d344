"""Every transform of optax_bema by name, for sweeps, benchmarks and tests.

A study that compares averages, or a test that runs each through the same
battery, names them by string: ``catalog.training('bema', 1e-3)`` is what a
user trains with, ``optax.chain(optax.adamw(1e-3), optax_bema.bema())``.
The stabilizers listed are the library's kinds themselves, so a new kind
joins every sweep and every test that iterates over them.

Examples:
  >>> from optax_bema import catalog
  >>> catalog.STABILIZERS
  ('ema', 'bema', 'dema', 'ouema', 'power_ema')
  >>> catalog.stabilizer('ema', ema_power=0.7, bias_power=0.2).kind
  'ema'
"""

from __future__ import annotations

import optax

import optax_bema
from optax_bema import _kinds

# Every kind of average, each the name of its factory.
STABILIZERS: tuple[str, ...] = _kinds.PUBLIC
# The four the BEMA paper compares (Block and Zhang 2025).
BEMA_PAPER = ('ema', 'bema', 'dema', 'ouema')
OPTIMIZERS = ('pace', 'adaptive_ademamix')
# Several averages in one transform, last in the chain like a stabilizer.
COMBINED = ('averages', 'posthoc_ema')
NAMES = STABILIZERS + OPTIMIZERS + COMBINED
# What a kind needs that has no default: EDM2's power EMA its width.
REQUIRED = {'power_ema': dict(std=0.1)}
# PACE has no default pullback or EMA power: the paper's headline setting.
PACE_DEFAULTS = dict(pullback=0.15, ema_power=0.2)
# Settings some kind's weights read; a kind that does not read one is
# built without it, so one sweep's settings serve every kind.
_WEIGHT_SETTINGS = frozenset().union(*(r.settings for r in
                                       _kinds.RULES.values()))


def stabilizer(name: str, **settings) -> optax.GradientTransformation:
  """The stabilizer ``name`` (``'ema'``, ...) with ``settings``.

  A weight setting the kind does not read (``bias_power`` for ``'ema'``,
  ``ema_power`` for ``'power_ema'``) is dropped; any other unknown
  argument is the factory's error.
  """
  if name not in STABILIZERS:
    raise ValueError(f'no stabilizer named {name!r}; one of {STABILIZERS}')
  unread = _WEIGHT_SETTINGS - set(_kinds.RULES[name].settings)
  kept = {k: v for k, v in settings.items() if k not in unread}
  return getattr(optax_bema, name)(**{**REQUIRED.get(name, {}), **kept})


def optimizer(name: str, learning_rate=1e-3,
              **hyperparams) -> optax.GradientTransformation:
  """The optimizer ``name``: ``'pace'`` or ``'adaptive_ademamix'``."""
  if name == 'pace':
    return optax_bema.pace(learning_rate, **{**PACE_DEFAULTS, **hyperparams})
  if name == 'adaptive_ademamix':
    return optax_bema.adaptive_ademamix(learning_rate, **hyperparams)
  raise ValueError(f'no optimizer named {name!r}; one of {OPTIMIZERS}')


def transform(name: str, learning_rate=1e-3,
              **hyperparams) -> optax.GradientTransformation:
  """The transform ``name`` alone; ``averages`` takes its members by name."""
  if name in STABILIZERS:
    return stabilizer(name, **hyperparams)
  if name in COMBINED:
    return getattr(optax_bema, name)(**hyperparams)
  return optimizer(name, learning_rate, **hyperparams)


def training(name: str, learning_rate=1e-3,
             **hyperparams) -> optax.GradientTransformation:
  """What a user trains with: an average goes last, after ``optax.adamw``;
  an optimizer stands alone."""
  if name in OPTIMIZERS:
    return optimizer(name, learning_rate, **hyperparams)
  return optax.chain(optax.adamw(learning_rate),
                     transform(name, **hyperparams))


def long_run_targets() -> dict:
  """Averages :func:`~optax_bema.posthoc_ema`'s defaults never track, which
  its snapshots at :func:`~optax_bema.snapshot_steps` synthesize within 2%
  of their distance from the last iterate on runs of 2e3 to 2e5 steps (SGD
  on a noisy quadratic)."""
  b = optax_bema
  return {
      'ema 0.4': b.ema(ema_power=0.4, update_freq=1),
      'ema 0.7 lag 50': b.ema(ema_power=0.7, lag=50, update_freq=1),
      'bema 0.5/0.3': b.bema(ema_power=0.5, bias_power=0.3, update_freq=1),
      'dema 0.6': b.dema(ema_power=0.6, update_freq=1),
      'ouema 0.5/0.2': b.ouema(ema_power=0.5, bias_power=0.2, update_freq=1),
      'ema()': b.ema(), 'bema()': b.bema(),
      'power 0.02': b.power_ema(0.02), 'power 0.05': b.power_ema(0.05),
      'power 0.1': b.power_ema(0.1), 'power 0.2': b.power_ema(0.2)}
