"""Paired timing: a contender's step against a baseline's, in one process.

The two alternate round by round, who goes first alternating too, and the
ratio reported is the median of the per-round ratios, so a noisy, shared
machine slows both alike. A training step is jitted with params and state
donated and ``optax.apply_updates`` fused in; its compile time and the
compiled program's own byte count (XLA's cost analysis) come with it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Wall and process CPU seconds per step, as one round of a contender reports.
Round = Callable[[], tuple[float, float]]


def make_step(tx, steps_per_call=1):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def steps(params, opt_state, grads):
    # Several steps per call leave out the host's per-call cost (about a
    # microsecond or two per array) and time the device alone.
    return jax.lax.fori_loop(0, steps_per_call,
                             lambda _, c: step(*c, grads), (params, opt_state))
  return jax.jit(step if steps_per_call == 1 else steps,
                 donate_argnums=(0, 1))


class TimedStep:
  """One optimizer's compiled step and the buffers it runs on."""

  def __init__(self, tx, params, grads, dump=None, steps_per_call=1):
    state = tx.init(params)
    self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    self.carry = (jax.tree.map(jnp.copy, params), state)
    self.grads = grads
    start = time.perf_counter()
    self.steps_per_call = steps_per_call
    self.compiled = make_step(tx, steps_per_call).lower(
        *self.carry, grads).compile()
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    self.hlo_bytes = float(cost.get('bytes accessed', float('nan')))
    if dump:
      with open(dump, 'w') as f:
        f.write(self.compiled.as_text())
    self.run(2)

  def run(self, steps: int) -> tuple[float, float]:
    """Wall and process CPU seconds per step, synchronised at the end."""
    start, cpu = time.perf_counter(), time.process_time()
    carry = self.carry
    for _ in range(steps):
      carry = self.compiled(*carry, self.grads)
    jax.block_until_ready(carry)
    self.carry = carry
    steps *= self.steps_per_call
    return ((time.perf_counter() - start) / steps,
            (time.process_time() - cpu) / steps)

  def release(self):
    jax.tree.map(lambda x: x.delete(), self.carry)


def timed(fn: Callable[[], None], calls: int) -> tuple[float, float]:
  """Wall and process CPU seconds per call of ``fn``."""
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    fn()
  return ((time.perf_counter() - start) / calls,
          (time.process_time() - cpu) / calls)


def paired_rounds(base: Round, other: Round, rounds: int):
  """Per-round (base, other) times, alternating who goes first."""
  times = []
  for r in range(rounds):
    if r % 2:
      t_other, t_base = other(), base()
    else:
      t_base, t_other = base(), other()
    times.append((t_base, t_other))
  return times


def quartiles(xs):
  q = np.percentile(xs, [25, 50, 75])
  return float(q[0]), float(q[1]), float(q[2])


def compare(base: Round, other: Round, rounds: int) -> dict:
  """Other's step as a multiple of the baseline's (AdamW's), as row fields.

  ``ratio`` and its quartiles are of the per-round wall-time ratios,
  ``cpu_ratio`` the median per-round ratio of process CPU time, and the
  milliseconds per step are each side's median.
  """
  times = paired_rounds(base, other, rounds)
  q1, ratio, q3 = quartiles([o[0] / b[0] for b, o in times])
  return dict(
      ratio=ratio, ratio_q1=q1, ratio_q3=q3,
      cpu_ratio=statistics.median(o[1] / b[1] for b, o in times),
      ms_step=1e3 * statistics.median(o[0] for _, o in times),
      adamw_ms_step=1e3 * statistics.median(b[0] for b, _ in times))


def copy_bandwidth(nbytes: int) -> float:
  """GB/s of an in-place scale of one large array, bytes read plus written."""
  f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
  x = f(jnp.ones(nbytes // 4, jnp.float32))
  times = []
  for _ in range(7):
    start = time.perf_counter()
    for _ in range(5):
      x = f(x)
    x.block_until_ready()
    times.append((time.perf_counter() - start) / 5)
  x.delete()
  return 2 * nbytes / statistics.median(times) / 1e9
