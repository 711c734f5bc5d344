"""Adaptive AdEMAMix against optax.contrib's AdEMAMix and a numpy noise loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

STEPS = 30


def run(tx, grads, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  iterates, states = [], []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(params)
    states.append(state)
  return iterates, states


def noise_fraction_reference(grads, rho):
  """s_t from the docstring's formula, in float64."""
  mean = variance = None
  fractions = []
  for g in np.asarray(grads, np.float64):
    if mean is None:
      mean, variance = g.copy(), np.zeros_like(g)
    else:
      delta = g - mean
      mean = mean + (1 - rho) * delta
      variance = rho * (variance + (1 - rho) * delta**2)
    fractions.append(variance.sum() / (variance.sum() + (mean**2).sum()))
  return np.array(fractions)


PARAMS = {'w': jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
          'b': jnp.array([0.5, -0.25])}
CONSTANT = {'w': jnp.full((3, 4), 0.3), 'b': jnp.array([2.0, -1.0])}


@pytest.mark.parametrize('clip_norm', [1.0, None])
def test_constant_gradient_is_plain_ademamix_exactly(clip_norm):
  lr = optax.linear_schedule(1e-3, 1e-2, 10)
  got, states = run(optax_bema.adaptive_ademamix(lr, clip_norm=clip_norm),
                    [CONSTANT] * STEPS, PARAMS)
  plain = optax.contrib.ademamix(lr, alpha=4.0, weight_decay=0.01)
  if clip_norm is not None:  # the global norm of CONSTANT is above 1
    plain = optax.chain(optax.clip_by_global_norm(clip_norm), plain)
  want, _ = run(plain, [CONSTANT] * STEPS, PARAMS)
  for g, w in zip(got, want):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  assert all(float(s[-3].noise_fraction) == 0.0 for s in states)
  assert all(float(s[-3].alpha) == 4.0 for s in states)


def test_noisy_gradient_raises_alpha_within_its_range():
  rng = np.random.default_rng(0)
  signal = rng.normal(size=16)
  alphas = {}
  for noise in (0.0, 0.3, 1.0, 3.0):
    grads = signal + noise * rng.normal(size=(STEPS, 16))
    _, states = run(optax_bema.adaptive_ademamix(1e-3, clip_norm=None),
                    jnp.asarray(grads, jnp.float32), jnp.zeros(16))
    alpha = np.array([float(s[-3].alpha) for s in states])
    fraction = np.array([float(s[-3].noise_fraction) for s in states])
    np.testing.assert_allclose(fraction, noise_fraction_reference(grads, 0.99),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(alpha, 4.0 * (1 + fraction), rtol=1e-6)
    assert np.all((alpha >= 4.0) & (alpha <= 8.0))
    alphas[noise] = alpha[-1]
  assert alphas[0.0] == 4.0
  assert 4.0 < alphas[0.3] < alphas[1.0] < alphas[3.0] <= 8.0


def test_pure_noise_nearly_doubles_alpha():
  grads = np.random.default_rng(1).normal(size=(60, 64))
  _, states = run(optax_bema.adaptive_ademamix(1e-3, variance_decay=0.9),
                  jnp.asarray(grads, jnp.float32), jnp.zeros(64))
  # The mean's EMA keeps (1 - rho) / (1 + rho) of the variance: s ~ 0.95.
  assert 7.5 < float(states[-1][-3].alpha) <= 8.0


def test_each_step_is_ademamix_with_that_steps_alpha():
  rng = np.random.default_rng(2)
  grads = jnp.asarray(rng.normal(size=(6, 5)) + 0.5, jnp.float32)
  params = jnp.asarray(rng.normal(size=5), jnp.float32)
  tx = optax_bema.adaptive_ademamix(1e-2, b3=0.99, alpha=2.0,
                                    clip_norm=None)
  state = tx.init(params)
  for g in grads:
    updates, new_state = tx.update(g, state, params)
    reference = optax.contrib.ademamix(
        1e-2, b3=0.99, alpha=float(new_state[0].alpha), weight_decay=0.01)
    reference_state = (state[0].ademamix,) + reference.init(params)[1:]
    want, want_state = reference.update(g, reference_state, params)
    np.testing.assert_allclose(updates, want, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new_state[0].ademamix,
                 want_state[0])
    state, params = new_state, optax.apply_updates(params, updates)
