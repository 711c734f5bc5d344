"""What a stabilizer costs per training step, as a multiple of plain AdamW.

Times one jitted, donated training step, ``optax.apply_updates`` fused in,
of ``optax.chain(optax.adamw(lr), X)`` for every stabilizer X at
``update_freq`` 1 and 400, and of ``optax_bema.pace``, each paired with plain
``optax.adamw`` in the same process: the two alternate round by round and
the reported ratio is the median of the per-round ratios, so a noisy,
shared machine slows both alike. Parameters are a GPT-like mix of leaves
(token and position embeddings, attention and MLP matrices, biases, layernorm
scales) at the sizes asked for.

These steps are bound by memory traffic: AdamW reads the gradient and reads
and writes params and both moments, about 7 parameter-sized transfers. The
``floor`` column is the ratio that traffic alone allows (an EMA updated
every step adds 3 transfers: 10/7 = 1.43); ``hlo`` is the same ratio read off
the compiled program's own byte count (XLA's cost analysis; it counts both
sides of a branch), which exposes any extra pass over memory. ``cpu`` is the
ratio of the process's CPU time, steadier than wall time on a loaded
machine; the ``adamw`` row times AdamW against itself, the noise floor.
``B/param`` is the state's extra bytes per parameter; ``+compile`` the extra
compile time. The JSON also gives the achieved bandwidth, against an
in-place copy's. ``--steps-per-call`` runs several steps in one call (a
``fori_loop``) to time the device without the host's per-call cost.

The contenders and their targets are tables below; the paired timing is
``_timing``'s, the TRL peer ``_peer``'s.

Usage:
  python benchmarks/cost/overhead.py              # 1M, 16M, 64M params
  python benchmarks/cost/overhead.py --quick      # CI scale, seconds
  python benchmarks/cost/overhead.py --sizes 125M,350M,1B --dtype bfloat16
  python benchmarks/cost/overhead.py --peer       # TRL's BEMACallback too
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import pathlib
import sys
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import optax_bema

# The helpers every group shares (_common) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common
import _timing
from optax_bema import catalog

LEARNING_RATE = 1e-3
# How many averages posthoc_ema() tracks by default (theta_0 aside).
_POSTHOC_DEFAULTS = inspect.signature(optax_bema.posthoc_ema).parameters
_POSTHOC_TRACKED = len(tuple(_POSTHOC_DEFAULTS['ema_powers'].default)
                       + tuple(_POSTHOC_DEFAULTS['stds'].default))
IDLE_FREQ = 400  # a stabilizer's default: most steps do not update it

# name: (width, layers, vocabulary, context); about 12 w^2 per layer.
SIZES = {
    '1M': (128, 4, 2048, 256),
    '16M': (512, 4, 8192, 512),
    '64M': (768, 8, 8192, 1024),
    '125M': (768, 12, 50304, 1024),
    '350M': (1024, 24, 50304, 1024),
    '770M': (1280, 36, 50304, 1024),
    '1B': (2048, 18, 50304, 2048),
}


def _is_shape(x):
  return isinstance(x, tuple)


def transformer_shapes(size: str) -> dict:
  """Leaf shapes of a GPT-2-like model of the named size."""
  width, layers, vocab, context = SIZES[size]
  shapes = {'wte': (vocab, width), 'wpe': (context, width),
            'ln_f': {'scale': (width,), 'bias': (width,)}}
  for i in range(layers):
    shapes[f'block{i}'] = {
        'ln1': {'scale': (width,), 'bias': (width,)},
        'qkv': {'kernel': (width, 3 * width), 'bias': (3 * width,)},
        'proj': {'kernel': (width, width), 'bias': (width,)},
        'ln2': {'scale': (width,), 'bias': (width,)},
        'fc': {'kernel': (width, 4 * width), 'bias': (4 * width,)},
        'out': {'kernel': (4 * width, width), 'bias': (width,)},
    }
  return shapes


def leaf_shapes(size: str) -> list[tuple[int, ...]]:
  return jax.tree.leaves(transformer_shapes(size), is_leaf=_is_shape)


def random_tree(shapes, dtype, seed, scale):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
       for k, s in zip(keys, leaves)])


class Transfers(NamedTuple):
  """The fewest parameter-sized transfers an update makes beyond AdamW's.

  Attributes:
    iterate: reads of the iterate, in the params' dtype.
    averages: reads or writes of averages, in their float32.
    state: transfers of the state bytes it holds beyond AdamW's, in their
      own dtypes (PACE's moments and EMA take its ``accumulator_dtype``).
  """
  iterate: int = 0
  averages: int = 0
  state: int = 0

  def bytes_per_param(self, param_bytes, extra_state_bytes):
    return (self.iterate * param_bytes + self.averages * 4
            + self.state * extra_state_bytes)


class Contender(NamedTuple):
  """A transform timed against AdamW, and the transfers it should add."""
  name: str
  transform: optax.GradientTransformation
  extra: Transfers
  update_freq: int = 1

  @property
  def label(self) -> str:
    return f'{self.name}{self.update_freq}'


def _stabilized(name, update_freq, extra=Transfers()) -> Contender:
  """``optax.adamw`` then the named stabilizer, as a user trains with it."""
  return Contender(name, catalog.training(name, LEARNING_RATE,
                                              update_freq=update_freq),
                   extra, update_freq)


# What each stabilizer moves on a step that updates it: the iterate read
# once, and each average read and written (OUEMA also reads theta_0; DEMA
# has two averages).
_EVERY_STEP = {'ema': Transfers(iterate=1, averages=2),
               'bema': Transfers(iterate=1, averages=2),
               'dema': Transfers(iterate=1, averages=4),
               'ouema': Transfers(iterate=1, averages=3),
               'power_ema': Transfers(iterate=1, averages=2)}


def contenders(names=()) -> list[Contender]:
  """Every contender, or those named by name or label (``ema``, ``bema1``)."""
  out = [
      # AdamW against itself: the ratio a shared, noisy machine reports for
      # zero overhead, the floor against which to read the others.
      Contender('adamw', optax.adamw(LEARNING_RATE), Transfers()),
      *(contender for name in catalog.STABILIZERS for contender in (
          _stabilized(name, 1, _EVERY_STEP[name]),
          _stabilized(name, IDLE_FREQ))),
      # Its own moments and EMA, each read and written once.
      Contender('pace', catalog.training('pace', LEARNING_RATE),
                Transfers(state=2)),
      # Several averages in one transform read the iterate once; each EMA
      # reads and writes its own copy: (8 + 2K) / 7 of AdamW's traffic.
      *(Contender(f'averages{k}', optax.chain(
          optax.adamw(LEARNING_RATE), optax_bema.averages(**{
              f'ema{i}': optax_bema.ema(ema_power=0.3 + 0.3 * i,
                                        update_freq=1) for i in range(k)})),
                  Transfers(iterate=1, averages=2 * k)) for k in (2, 3)),
      # Its default averages; theta_0 is held, never touched.
      Contender('posthoc_ema', optax.chain(optax.adamw(LEARNING_RATE),
                                           optax_bema.posthoc_ema()),
                Transfers(iterate=1, averages=2 * _POSTHOC_TRACKED)),
  ]
  return [c for c in out if not names or c.name in names or c.label in names]


class Target(NamedTuple):
  """A bound on a contender's ratio to AdamW's step."""
  ratio: float
  over_floor: bool = False  # the bound is then ratio times the memory floor

  def bound(self, floor: float) -> float:
    return round(floor * self.ratio, 3) if self.over_floor else self.ratio


# Within 10% of the ratio that its memory traffic alone allows.
NEAR_FLOOR = Target(1.10, over_floor=True)
# A stabilizer that is not due on a step should cost about nothing on it.
IDLE_STEP = Target(1.02)
# The targets on CPU, by contender label; a label not listed is held
# NEAR_FLOOR, and the AdamW control has none.
TARGETS = {
    'adamw1': None,
    # fixed budgets, updated every step
    'ema1': Target(1.5), 'bema1': Target(1.8), 'pace1': Target(1.35),
    'power_ema1': Target(1.5),
    'dema1': NEAR_FLOOR, 'ouema1': NEAR_FLOOR,
    **{f'{name}{IDLE_FREQ}': IDLE_STEP for name in catalog.STABILIZERS},
}


def target_for(contender: Contender, floor: float) -> Optional[float]:
  """The ratio the contender should stay under; None for the control."""
  goal = TARGETS.get(contender.label, NEAR_FLOOR)
  return None if goal is None else goal.bound(floor)


def bench_size(size, dtype, args, log):
  shapes = transformer_shapes(size)
  params = random_tree(shapes, dtype, 0, 0.02)
  grads = random_tree(shapes, dtype, 1, 1e-3)
  n = sum(x.size for x in jax.tree.leaves(params))
  p_bytes = jnp.dtype(dtype).itemsize

  def timed_step(tx, tag):
    dump = args.dump_hlo and os.path.join(args.dump_hlo,
                                          f'{size}_{dtype}_{tag}.txt')
    return _timing.TimedStep(tx, params, grads, dump, args.steps_per_call)

  base = timed_step(optax.adamw(LEARNING_RATE), 'adamw')
  # The gradient read, params and both moments read and written.
  base_bytes = 3 * p_bytes + 2 * base.state_bytes / n
  t, _ = base.run(3)
  steps = max(2, math.ceil(args.round_s / t / args.steps_per_call))
  log(f'{size} {dtype}: {n / 1e6:.1f}M params in '
      f'{len(jax.tree.leaves(params))} leaves; AdamW {1e3 * t:.2f} ms/step '
      f'({base_bytes:.0f} B/param: {base_bytes * n / t / 1e9:.0f} GB/s), '
      f'{steps} steps per round')
  rows = []
  for contender in contenders(args.configs):
    other = timed_step(contender.transform, contender.label)
    timing = _timing.compare(functools.partial(base.run, steps),
                             functools.partial(other.run, steps), args.rounds)
    other.release()
    state_bytes = (other.state_bytes - base.state_bytes) / n
    extra = contender.extra.bytes_per_param(p_bytes, state_bytes)
    floor = (base_bytes + extra) / base_bytes
    target = target_for(contender, floor)
    base_s, other_s = timing['adamw_ms_step'] / 1e3, timing['ms_step'] / 1e3
    rows.append(dict(
        size=size, params=n, dtype=str(jnp.dtype(dtype)),
        name=contender.name, update_freq=contender.update_freq, **timing,
        adamw_gb_s=base_bytes * n / base_s / 1e9,
        extra_gb_s=(extra * n / max(other_s - base_s, 1e-9) / 1e9
                    if extra else None),
        state_bytes_per_param=state_bytes,
        adamw_state_bytes_per_param=base.state_bytes / n,
        compile_s=other.compile_s,
        extra_compile_s=other.compile_s - base.compile_s,
        hlo_ratio=other.hlo_bytes / base.hlo_bytes,
        floor=floor, target=target,
        met=None if target is None else bool(timing['ratio'] <= target),
        rounds=args.rounds, steps_per_round=steps,
        steps_per_call=args.steps_per_call))
    log(format_row(rows[-1]))
  base.release()
  return rows


HEADER = (f"{'size':>5} {'dtype':>8} {'optimizer':>9} {'freq':>4} "
          f"{'ratio':>6} {'[q1, q3]':>13} {'cpu':>5} {'ms/step':>8} "
          f"{'adamw':>8} {'floor':>5} {'hlo':>5} {'target':>7} "
          f"{'B/param':>7} {'+compile':>8}")


def format_row(r):
  target = ('control' if r['target'] is None else
            f"{r['target']:6.3f}{' ' if r['met'] else '!'}")
  return (f"{r['size']:>5} {r['dtype']:>8} {r['name']:>9} "
          f"{r['update_freq']:>4} {r['ratio']:6.3f} "
          f"[{r['ratio_q1']:5.3f},{r['ratio_q3']:5.3f}] "
          f"{r['cpu_ratio']:5.2f} "
          f"{r['ms_step']:8.3f} {r['adamw_ms_step']:8.3f} {r['floor']:5.2f} "
          f"{r['hlo_ratio']:5.2f} {target:>7} "
          f"{r['state_bytes_per_param']:7.1f} {r['extra_compile_s']:+7.2f}s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='1M,16M,64M',
                      help=f'comma-separated, of {", ".join(SIZES)}')
  parser.add_argument('--dtype', default='float32',
                      help='float32, bfloat16, or both comma-separated; '
                      'averages stay float32')
  parser.add_argument('--rounds', type=int, default=9)
  parser.add_argument('--round-s', type=float, default=0.3,
                      help='seconds each contender runs per round')
  parser.add_argument('--steps-per-call', type=int, default=1,
                      help='steps in one jitted call (a fori_loop); 1 '
                      'includes the host cost of a call, as training has')
  parser.add_argument('--configs', default='',
                      help='only these, e.g. ema,bema1,pace')
  parser.add_argument('--quick', action='store_true',
                      help='CI scale: 1M params, 3 short rounds')
  parser.add_argument('--peer', action='store_true',
                      help="also time TRL's BEMACallback against torch AdamW "
                      '(needs the `peers` extra: torch, trl)')
  parser.add_argument('--dump-hlo', default='',
                      help='write each optimized HLO module to this folder')
  parser.add_argument('--out', default='benchmarks/results/cost/overhead')
  parser.add_argument('--name', default='overhead',
                      help='the JSON file is OUT/NAME.json')
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.rounds, args.round_s = '1M', 3, 0.05
  args.configs = [c for c in args.configs.split(',') if c]
  os.makedirs(args.out, exist_ok=True)
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
  lines = []

  def log(line):
    print(line, flush=True)
    lines.append(line)

  info = _common.machine()
  info['copy_gb_s'] = _timing.copy_bandwidth(
      2**30 if info['platform'] == 'gpu' else 2**28)
  log(f"{info['device']} ({info['platform']}, {info['cpu_count']} CPUs), "
      f"jax {info['jax']}, optax {info['optax']}; an in-place copy moves "
      f"{info['copy_gb_s']:.0f} GB/s")
  log(HEADER)
  rows = []
  path = os.path.join(args.out, f'{args.name}.json')

  def save():  # after every size, so that a run cut short keeps its rows
    with open(path, 'w') as f:
      json.dump(dict(machine=info, args=vars(args), rows=rows, table=lines),
                f, indent=1)

  for dtype in args.dtype.split(','):
    for size in args.sizes.split(','):
      rows += bench_size(size, jnp.dtype(dtype), args, log)
      save()
  if args.peer:
    # Only here: it needs the peers extra.
    import _peer  # pylint: disable=g-import-not-at-top
    for size in args.sizes.split(','):
      rows.append(_peer.bench_peer(size, leaf_shapes(size), LEARNING_RATE,
                                   args.rounds, args.round_s, log))
      save()
  missed = [r for r in rows if r.get('met') is False]
  log(f'{len(missed)} of {sum(r.get("met") is not None for r in rows)} '
      'targets missed'
      + ''.join(f"\n  {r['size']} {r['dtype']} {r['name']}"
                f"@{r['update_freq']}: {r['ratio']:.3f} > {r['target']}"
                for r in missed))
  save()
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
