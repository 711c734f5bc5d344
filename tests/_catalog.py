"""Every public transform of optax_bema by name, for the tests.

One place builds them, so the contract battery, the stabilizer tests and
the compiled-step pins all mean the same thing by ``'bema'`` or ``'pace'``.
"""

from __future__ import annotations

import optax

import optax_bema

STABILIZERS = ('ema', 'bema', 'dema', 'ouema')
OPTIMIZERS = ('pace', 'adaptive_ademamix')
# Several averages in one transform, last in the chain like a stabilizer.
COMBINED = ('averages', 'posthoc_ema')
NAMES = STABILIZERS + OPTIMIZERS + COMBINED
# The bias weight means nothing to EMA and DEMA; passing it would be an error.
_TAKES_BIAS_POWER = ('bema', 'ouema')
# PACE has no default pullback or EMA power: the paper's headline setting.
PACE_DEFAULTS = dict(pullback=0.15, ema_power=0.2)


def stabilizer(name: str, **hyperparams) -> optax.GradientTransformation:
  """The named stabilizer; the bias weight's settings are dropped where they
  mean nothing."""
  if name not in STABILIZERS:
    raise ValueError(f'no stabilizer named {name!r}; one of {STABILIZERS}')
  if name not in _TAKES_BIAS_POWER:
    hyperparams.pop('bias_power', None)
    hyperparams.pop('bias_multiplier', None)
  return getattr(optax_bema, name)(**hyperparams)


def optimizer(name: str, learning_rate=1e-3,
              **hyperparams) -> optax.GradientTransformation:
  """The named optimizer: ``pace`` or ``adaptive_ademamix``."""
  if name == 'pace':
    return optax_bema.pace(learning_rate, **{**PACE_DEFAULTS, **hyperparams})
  if name == 'adaptive_ademamix':
    return optax_bema.adaptive_ademamix(learning_rate, **hyperparams)
  raise ValueError(f'no optimizer named {name!r}; one of {OPTIMIZERS}')


def transform(name: str, learning_rate=1e-3,
              **hyperparams) -> optax.GradientTransformation:
  """The named transform alone; ``averages`` takes its members by name."""
  if name in STABILIZERS:
    return stabilizer(name, **hyperparams)
  if name in COMBINED:
    return getattr(optax_bema, name)(**hyperparams)
  return optimizer(name, learning_rate, **hyperparams)


def training(name: str, learning_rate=1e-3,
             **hyperparams) -> optax.GradientTransformation:
  """What a user trains with: an average goes last after ``optax.adamw``."""
  if name in OPTIMIZERS:
    return optimizer(name, learning_rate, **hyperparams)
  return optax.chain(optax.adamw(learning_rate),
                     transform(name, **hyperparams))
