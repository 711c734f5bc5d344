"""16-bit averages: stochastic rounding keeps them moving and unbiased.

The reference is the same average accumulated in float32; the drift is
float32 weights moving steadily from 1 to 2 over 4000 steps, averaged every
step, where a bfloat16 average rounded to nearest stops moving.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import _rounding
from optax_bema import catalog

STEPS = 4000
WIDTH = 64


def _drift(tx):
  """The model after float32 weights drift 1 -> 2 in STEPS steps, and the
  state."""
  params = jnp.ones(WIDTH, jnp.float32)

  @jax.jit
  def run(params, state):
    def body(carry, t):
      p, s = carry
      step = 1.0 + (t + 1.0) / STEPS - p
      _, s = tx.update(step, s, p)
      return (p + step, s), None
    return jax.lax.scan(body, (params, state),
                        jnp.arange(STEPS, dtype=jnp.float32))[0]
  params, state = run(params, tx.init(params))
  return np.asarray(optax_bema.averaged_params(state, params)), state


DRIFT_KINDS = {
    'ema': lambda **k: optax_bema.ema(ema_power=0.5, update_freq=1, **k),
    'bema': lambda **k: optax_bema.bema(ema_power=0.5, update_freq=1, **k),
    'power_ema': lambda **k: optax_bema.power_ema(0.1, **k),
}


@pytest.mark.parametrize('kind', list(DRIFT_KINDS))
def test_bfloat16_average_follows_the_float32_one_to_the_bit_again(kind):
  make = DRIFT_KINDS[kind]
  reference, _ = _drift(make())
  got, state = _drift(make(accumulator_dtype=jnp.bfloat16))
  again, state_again = _drift(make(accumulator_dtype=jnp.bfloat16))
  move = float(np.mean(reference)) - 1.0
  # Within 1% of the float32 average's move, element by element.
  assert np.max(np.abs(got - reference)) < 0.01 * move
  # Half the bytes of the float32 state.
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.ema))
  # Two runs, one result, to the bit.
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(got, again)


def test_a_periodic_bfloat16_average_moves_and_stays_unbiased():
  """Updated every 10 steps it is stored by value, rounded stochastically:
  its mean follows the float32 average's (round to nearest stops)."""
  make = lambda **k: optax_bema.ema(update_freq=10, **k)
  reference, _ = _drift(make())
  got, _ = _drift(make(accumulator_dtype=jnp.bfloat16))
  move = float(np.mean(reference)) - 1.0
  assert abs(np.mean(got) - np.mean(reference)) < 0.005 * move
  # One bfloat16 ulp at 2 is 2 ** -6: an element is off by about one.
  assert np.mean(np.abs(got - reference)) < 2 * 2.0 ** -6


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
  x = jnp.full((200_000,), 1.0 + 2.0 ** -12, jnp.float32)  # 1/32 of an ulp
  for dtype in (jnp.bfloat16, jnp.float16):
    got = np.asarray(_rounding.round_stochastically(
        x, dtype, jnp.uint32(7)), np.float64)
    ulp = float(jnp.finfo(dtype).eps)
    assert set(np.unique(got)) <= {1.0, 1.0 + ulp}
    # The mean is x within 5 standard errors.
    error = np.sqrt(got.size * (2.0 ** -12 / ulp)) * ulp / got.size
    assert abs(got.mean() - float(x[0])) < 5 * error
    exact = jnp.asarray([1.0, -2.5, 0.0, 3.0], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(_rounding.round_stochastically(exact, dtype, 3)),
        np.asarray(exact).astype(dtype))


@pytest.mark.parametrize('kind', catalog.STABILIZERS)
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
@pytest.mark.parametrize('accumulator', [None, 'bfloat16'])
def test_a_finite_but_huge_iterate_leaves_a_finite_model(kind, dtype,
                                                         accumulator):
  """A loss spike moves the weights to -6e4 (near float16's largest) and
  back: the params stay finite, and so does every model."""
  tx = optax.chain(optax.sgd(1.0), catalog.stabilizer(
      kind, update_freq=1, accumulator_dtype=accumulator))
  params = jnp.ones(4, dtype)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for target in (1.5, -6e4, 2.0, 2.5):
    grads = params - jnp.asarray(target, dtype)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert np.isfinite(np.asarray(params, np.float64)).all()
    model = optax_bema.averaged_params(state, params)
    assert np.isfinite(np.asarray(model, np.float64)).all(), (kind, target)


def test_constructors_refuse_weights_infinite_in_float32():
  with pytest.raises(ValueError, match='bias_multiplier'):
    optax_bema.bema(lag=0, ema_power=1, bias_multiplier=0)
  with pytest.raises(ValueError, match='bias_multiplier'):
    optax_bema.ouema(bias_multiplier=1e-7, update_freq=1)


def test_posthoc_ema_in_bfloat16_synthesizes_from_its_snapshots():
  """Snapshots of bfloat16 averages (deviations from the params) are read
  back as the averages: a tracked one is synthesized as itself, and a
  target's model lies within the float32 run's error of it."""
  def run(accumulator_dtype):
    tx = optax.chain(optax.sgd(1.0), optax_bema.posthoc_ema(
        accumulator_dtype=accumulator_dtype))
    params = jnp.ones(8, jnp.float32)
    state, snapshots, steps = tx.init(params), [], 300
    keep = set(optax_bema.snapshot_steps(steps, 12))
    snapshots.append((state, params))
    step = jax.jit(tx.update)
    for t in range(1, steps + 1):
      updates, state = step(params - (1.0 + t / steps), state, params)
      params = optax.apply_updates(params, updates)
      if t in keep:
        snapshots.append((state, params))
    return optax_bema.synthesize(
        {'ema 0.5': optax_bema.ema(ema_power=0.5, update_freq=1),
         'ema 0.7': optax_bema.ema(ema_power=0.7, update_freq=1)},
        snapshots, ridge=1e-3).model, params
  wide, final = run(None)
  narrow, _ = run(jnp.bfloat16)
  for name in wide:
    move = float(np.mean(final)) - float(np.mean(wide[name]))
    assert np.max(np.abs(np.asarray(narrow[name])
                         - np.asarray(wide[name]))) < 0.05 * abs(move) + 1e-3
