"""Learning-rate schedules as the PACE paper defines them.

Every schedule starts with the same linear warmup: step k (counted from 1)
uses ``peak * min(k / W, 1)``, W about 5% of the run. After it:

* ``constant``: the peak rate;
* ``cosine``: ``peak * (1 + cos(pi (k - W) / (T - W))) / 2``, 0 at step T;
* ``wsd`` (warmup-stable-decay): the peak rate until 0.8 T, then linearly
  to 0 at step T.

Optax calls a schedule with the number of steps already taken, so step k
reads ``schedule(k - 1)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'cosine', 'wsd')
WARMUP_FRACTION = 0.05
DECAY_FRACTION = 0.2   # wsd's final linear decay: the last 20% of the steps


def warmup_steps(steps: int) -> int:
  return max(1, round(WARMUP_FRACTION * steps))


def learning_rate(peak: float, schedule: str, steps: int) -> optax.Schedule:
  """The rate of ``schedule`` at its peak ``peak`` over a run of ``steps``."""
  if schedule not in SCHEDULES:
    raise ValueError(f'no schedule {schedule!r}; one of {SCHEDULES}')
  warmup = warmup_steps(steps)
  decay_start = (1 - DECAY_FRACTION) * steps

  def rate(count):
    k = jnp.asarray(count, jnp.float32) + 1
    scale = jnp.minimum(k / warmup, 1.0)
    if schedule == 'cosine':
      progress = jnp.clip((k - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      scale *= (1 + jnp.cos(jnp.pi * progress)) / 2
    elif schedule == 'wsd':
      scale *= jnp.clip((steps - k) / (steps - decay_start), 0.0, 1.0)
    return peak * scale
  return rate
