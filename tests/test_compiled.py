"""The compiled training step's memory traffic, pinned on CPU.

For every stabilizer after ``optax.adamw`` at ``update_freq`` 1 and 400,
``update_after`` 0 and 100, with and without ``offload_to_host``, and for
PACE, the jitted step with params and state donated (``tx.update``, then
``optax.apply_updates``) is compiled, not run, and its program is checked
against ``compiled_baseline.json``:

- parameter-sized copies: ``copy`` instructions anywhere in the program
  (conditional branches included) whose result has the dimensions of a
  parameter leaf. With both inputs donated every update can happen in place,
  so each such copy is an extra pass over a parameter's worth of memory.
  There may be no more of them than recorded. Offloaded stabilizers have
  some: fields set to theta_t (a burn-in reset, BEMA's theta_0) are written
  in a branch taken only on those steps, and on CPU, where host memory is
  device memory, XLA writes them with a copy. PACE under bfloat16 weights
  has one per leaf: XLA's excess precision feeds its EMA the unrounded
  float32 sum of params and updates, which it recomputes from the donated
  params next to the in-place write of the new params.
- bytes accessed, from XLA's cost analysis (which counts both sides of a
  branch), as a ratio to plain ``optax.adamw``'s step compiled in the same
  process. It must stay within 2% of the recorded ratio, either way: a drop
  is a gain to keep, so record it and the pin stays tight.

CI installs whatever jax is current, and a new XLA moves the absolute byte
counts of both programs alike; their ratio is what this library controls.
So only ratios are asserted; the absolute bytes are recorded with the jax
version for reading, and under the recorded jax they would say nothing the
ratio does not (the denominator is the same optax program).

The step is ``update`` then ``apply_updates``, the transforms built by
``catalog.training``. The params are one matrix and one bias
vector, of dimensions no other array in the program has; more leaves would
only repeat the same per-leaf code and slow the compiles. The float32 grid
is repeated under bfloat16 weights for each transform's every-step update,
where casts to the float32 averages change what XLA fuses. Offloaded steps
also give ``in_shardings`` and ``out_shardings``, without which ``jit`` may
alias a donated host buffer to a device output (see ``test_offload.py``).

To record the baseline from a given library (the committed one, say), run
from the repository root:
  PYTHONPATH=<checkout> python tests/test_compiled.py --record
and to test that library, ``PYTHONPATH=<checkout> pytest tests/...``:
``python -m pytest`` puts the current directory, and its library, first.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import jaxlib
import optax
import pytest

import optax_bema
from optax_bema import catalog

BASELINE = pathlib.Path(__file__).with_name('compiled_baseline.json')
BYTES_TOLERANCE = 0.02
SHAPES = {'kernel': (48, 160), 'bias': (160,)}
LEARNING_RATE = 1e-3


def _configs() -> dict[str, tuple[str, str, dict]]:
  """id: (transform name, params dtype, hyperparameters)."""
  out = {}
  for name in catalog.STABILIZERS:
    for freq in (1, 400):
      for after in (0, 100):
        for offload in (False, True):
          key = (f'{name}-freq{freq}-after{after}'
                 + ('-offload' if offload else ''))
          out[key] = (name, 'float32', dict(
              update_freq=freq, update_after=after, offload_to_host=offload))
    # The averages are float32 under bfloat16 weights: a cast on the way in.
    out[f'{name}-freq1-after0-bfloat16'] = (name, 'bfloat16',
                                            dict(update_freq=1))
    # bfloat16 averages of float32 weights, rounded stochastically: every
    # step as deviations from the params, every 400 steps by value.
    for freq in (1, 400):
      out[f'{name}-freq{freq}-after0-accumulator-bfloat16'] = (
          name, 'float32', dict(update_freq=freq,
                                accumulator_dtype=jnp.bfloat16))
  # Three EMAs and theta_0 with one shared non-finite test.
  out['posthoc_ema'] = ('posthoc_ema', 'float32', {})
  out['posthoc_ema-accumulator-bfloat16'] = (
      'posthoc_ema', 'float32', dict(accumulator_dtype=jnp.bfloat16))
  out['pace'] = ('pace', 'float32', {})
  out['pace-bfloat16'] = ('pace', 'bfloat16', {})
  return out


CONFIGS = _configs()


def _params(dtype):
  return {name: jnp.zeros(shape, dtype) for name, shape in SHAPES.items()}


def _step(tx):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _compile(tx, dtype, offload=False):
  params = _params(dtype)
  state = tx.init(params)
  if offload:
    shardings = jax.tree.map(lambda x: x.sharding, (params, state))
    step = jax.jit(_step(tx), donate_argnums=(0, 1),
                   in_shardings=(*shardings, None), out_shardings=shardings)
  else:
    step = jax.jit(_step(tx), donate_argnums=(0, 1))
  return step.lower(params, state, params).compile()


def parameter_sized_copies(hlo_text: str) -> int:
  """How many ``copy`` instructions yield an array shaped like a parameter."""
  dims = {','.join(map(str, shape)) for shape in SHAPES.values()}
  copies = re.findall(r'= \w+\[([\d,]*)\]\S* copy\(', hlo_text)
  return sum(d in dims for d in copies)


def bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  # A list with one dict per program in older jax, a dict in newer.
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['bytes accessed'])


@functools.cache
def adamw_bytes(dtype: str) -> float:
  return bytes_accessed(_compile(optax.adamw(LEARNING_RATE), dtype))


def measure(config: str) -> dict:
  name, dtype, hyperparams = CONFIGS[config]
  tx = catalog.training(name, LEARNING_RATE, **hyperparams)
  compiled = _compile(tx, dtype, hyperparams.get('offload_to_host', False))
  size = bytes_accessed(compiled)
  return dict(copies=parameter_sized_copies(compiled.as_text()),
              bytes=size, ratio=size / adamw_bytes(dtype))


@functools.cache
def _baseline() -> dict:
  if not BASELINE.exists():
    pytest.fail(f'{BASELINE.name} is missing; record it with --record.')
  baseline = json.loads(BASELINE.read_text())
  if baseline['params'] != {k: list(v) for k, v in SHAPES.items()}:
    pytest.fail(f'{BASELINE.name} was recorded for other params; record '
                'it again with --record.')
  return baseline


pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu',
    reason='the baseline holds XLA:CPU programs')


def test_copies_are_counted_where_donation_cannot_work_in_place():
  """Returning the old params beside the new forces one copy per leaf."""
  params = _params('float32')
  add_one = lambda p: jax.tree.map(lambda x: x + 1, p)
  in_place = jax.jit(add_one, donate_argnums=0)
  keeps_old = jax.jit(lambda p: (add_one(p), p), donate_argnums=0)
  assert parameter_sized_copies(
      in_place.lower(params).compile().as_text()) == 0
  assert parameter_sized_copies(
      keeps_old.lower(params).compile().as_text()) == len(SHAPES)


@pytest.mark.parametrize('config', list(CONFIGS))
def test_compiled_step_matches_baseline(config):
  recorded = _baseline()['configs'].get(config)
  if recorded is None:
    pytest.fail(f'no baseline for {config}; record it with --record.')
  got = measure(config)
  assert got['copies'] <= recorded['copies'], (
      f'{config}: {got["copies"]} parameter-sized copies, '
      f'{recorded["copies"]} recorded')
  change = got['ratio'] / recorded['ratio'] - 1
  assert abs(change) <= BYTES_TOLERANCE, (
      f'{config}: bytes accessed {got["ratio"]:.4f} x AdamW\'s, '
      f'{recorded["ratio"]:.4f} recorded ({change:+.1%}); '
      + ('a regression' if change > 0 else 'a gain: record it with --record'))


def record():
  """Writes the baseline from the library now on the path."""
  if jax.default_backend() != 'cpu':
    sys.exit('record on CPU: the baseline holds XLA:CPU programs')
  print(f'recording from {optax_bema.__file__}, jax {jax.__version__}')
  configs = {}
  for config in CONFIGS:
    configs[config] = measure(config)
    print(f'{config:>34} {configs[config]["copies"]:3d} copies '
          f'{configs[config]["ratio"]:7.4f} x AdamW')
  baseline = dict(
      jax=jax.__version__, jaxlib=jaxlib.__version__,
      optax=optax.__version__,
      params={k: list(v) for k, v in SHAPES.items()},
      adamw_bytes={dtype: adamw_bytes(dtype)
                   for dtype in ('float32', 'bfloat16')},
      configs=configs)
  BASELINE.write_text(json.dumps(baseline, indent=1) + '\n')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
      description='Records the compiled steps\' baseline.')
  parser.add_argument('--record', action='store_true', required=True,
                      help=f'write {BASELINE.name}')
  parser.parse_args()
  record()
