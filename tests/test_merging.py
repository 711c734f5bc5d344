"""Checkpoint merging as a learning-rate decay (WSM, arXiv 2507.17634; PMA,
arXiv 2505.12082).

With a constant rate, a merge sum_i c_i theta_{s_i} applies the update at
step t with the multiplier m_t = sum_{i: s_i > t} c_i. ``decay_profile``
chooses c so that m_t follows a decay shape w over the window; the tests
check its weights against closed forms, the multiplier against numpy runs
whose rate decays, and a merge's loss on a noisy quadratic against SGD
decayed over the same window with the same noise.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import optax_bema

SHAPES = {
    'linear': lambda u: 1 - u,
    'cosine': lambda u: (1 + math.cos(math.pi * u)) / 2,
    '1-sqrt': lambda u: 1 - math.sqrt(u),
}


def _closed_form(shape, k):
  """The weights on s_1..s_k of an even spacing, written out per shape."""
  i = np.arange(1, k + 1)
  if shape == 'linear':
    return np.full(k, 1 / k)
  if shape == 'cosine':
    return (np.cos(np.pi * (i - 1) / k) - np.cos(np.pi * i / k)) / 2
  return np.sqrt(i / k) - np.sqrt((i - 1) / k)


@pytest.mark.parametrize('shape', SHAPES)
def test_even_spacing_matches_the_closed_form(shape):
  steps = list(range(800, 1001, 25))   # s_0 = 800, k = 8 intervals
  w = optax_bema.decay_profile(steps, 1000, shape)
  assert w.shape == (1001,)
  np.testing.assert_allclose(w[steps[1:]], _closed_form(shape, 8),
                             rtol=1e-12, atol=1e-15)
  assert w[800] == 0 and np.count_nonzero(w) == 8


@pytest.mark.parametrize('shape', SHAPES)
def test_weights_sum_to_one_on_saved_steps_and_are_nonnegative(shape):
  steps = [3, 7, 8, 20, 21, 40, 41, 42, 60]   # uneven, and out of order:
  w = optax_bema.decay_profile(steps[::-1], 60, shape)
  assert math.isclose(w.sum(), 1.0, abs_tol=1e-12)
  assert set(np.flatnonzero(w)) <= set(steps[1:])
  assert (w >= 0).all()


@pytest.mark.parametrize('shape', SHAPES)
def test_tail_sums_are_the_shape_at_each_interval_start(shape):
  """m_t for t in [s_{i-1}, s_i) is w((s_{i-1} - s_0) / (T - s_0))."""
  steps = [10, 13, 20, 22, 31, 50]
  w = optax_bema.decay_profile(steps, 50, shape)
  for start, end in zip(steps[:-1], steps[1:]):
    for t in range(start, end):
      multiplier = w[t + 1:].sum()
      assert math.isclose(multiplier, SHAPES[shape]((start - 10) / 40),
                          abs_tol=1e-12)


def test_linear_on_even_spacing_is_the_plain_mean_after_the_anchor():
  steps = list(range(240, 301, 10))
  np.testing.assert_allclose(optax_bema.decay_profile(steps, 300, 'linear'),
                             optax_bema.uniform_profile(steps[1:], 300),
                             atol=1e-15)


@pytest.mark.parametrize('shape', SHAPES)
def test_a_callable_equals_its_named_twin(shape):
  steps = [0, 4, 5, 9, 16]
  np.testing.assert_allclose(
      optax_bema.decay_profile(steps, 16, SHAPES[shape]),
      optax_bema.decay_profile(steps, 16, shape), atol=1e-15)


@pytest.mark.parametrize('steps,num_steps,decay,match', [
    ([5, 5, 10], 10, 'linear', 'distinct'),
    ([10], 10, 'linear', 'at least two'),
    ([0, 5], 10, 'linear', 'num_steps=10'),
    ([0, 5, 12], 10, 'linear', 'num_steps=10'),
    ([0, 10], 10, 'exponential', "'linear', 'cosine', '1-sqrt'"),
    ([0, 10], 10, lambda u: 0.9 - u, r'w\(0\) = 0.9'),
    ([0, 10], 10, lambda u: 1 - u / 2, r'w\(1\) = 0.5'),
    ([0, 5, 10], 10, lambda u: 1 - u if u != 0.5 else math.nan, 'finite'),
])
def test_bad_inputs_are_refused(steps, num_steps, decay, match):
  with pytest.raises(ValueError, match=match):
    optax_bema.decay_profile(steps, num_steps, decay)


def test_a_step_that_is_not_an_integer_is_refused():
  with pytest.raises(TypeError, match='integer'):
    optax_bema.decay_profile([0, 5.0, 10], 10)


@pytest.mark.parametrize('shape', SHAPES)
def test_merge_equals_the_decayed_run_when_updates_ignore_the_params(shape):
  """Fixed updates: every step saved, the merge IS the decayed run."""
  rng = np.random.default_rng(0)
  lr, start, num_steps = 0.3, 40, 60
  updates = rng.normal(size=(num_steps, 3))
  constant = np.concatenate([np.zeros((1, 3)),
                             -lr * np.cumsum(updates, 0)])   # theta_0..T
  steps = list(range(start, num_steps + 1))
  merged = optax_bema.decay_profile(steps, num_steps, shape) @ constant
  rates = [lr if t < start else lr * SHAPES[shape]((t - start) / 20)
           for t in range(num_steps)]
  decayed = -np.einsum('t,td->d', rates, updates)
  np.testing.assert_allclose(merged, decayed, atol=1e-12)


def test_replay_of_a_merge_is_the_weighted_sum_of_the_saved_params():
  rng = np.random.default_rng(1)
  steps = [0] + list(range(20, 41, 4))
  saved = [(s, {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                'b': jnp.asarray(rng.normal(size=4), jnp.float32)})
           for s in steps]
  targets = {shape: optax_bema.decay_profile(steps[1:], 40, shape)
             for shape in SHAPES}
  models = optax_bema.replay(targets, saved)
  for shape, w in targets.items():
    for leaf in ('w', 'b'):
      expected = sum(w[s] * np.asarray(p[leaf], np.float64) for s, p in saved)
      np.testing.assert_allclose(models[shape][leaf], expected, atol=2e-6)


# Noisy quadratic: loss 0.5 sum_j h_j theta_j^2, gradient h theta + noise.
CURVATURES = np.linspace(0.2, 2.0, 5)
LR, WINDOW, NUM_STEPS, EVERY, SEEDS = 0.1, 50, 250, 5, 400


def _sgd(noise, rates):
  """SGD from theta = 1 (seeds, dims), every iterate: (steps + 1, ...)."""
  theta = np.ones(noise.shape[1:])
  path = [theta]
  for rate, xi in zip(rates, noise):
    theta = theta - rate * (CURVATURES * theta + xi)
    path.append(theta)
  return np.stack(path)


def _loss(theta):
  return float((0.5 * CURVATURES * theta ** 2).sum(-1).mean())


@pytest.mark.parametrize('shape', SHAPES)
def test_on_a_noisy_quadratic_a_merge_is_as_good_as_the_decay(shape):
  """Constant-rate SGD merged over its last 50 of 250 steps (checkpoints
  every 5) against SGD whose rate decays over those 50 steps with the same
  shape, on the same noise; the expected losses (closed form, summed over
  the curvatures) are last iterate 0.132, and decayed / merged 0.056 /
  0.049 (linear), 0.062 / 0.057 (cosine), 0.050 / 0.054 (1-sqrt)."""
  noise = np.random.default_rng(2).normal(
      size=(NUM_STEPS, SEEDS, len(CURVATURES)))
  start = NUM_STEPS - WINDOW
  constant = _sgd(noise, [LR] * NUM_STEPS)
  decayed = _sgd(noise, [LR if t < start else
                         LR * SHAPES[shape]((t - start) / WINDOW)
                         for t in range(NUM_STEPS)])
  window = list(range(start, NUM_STEPS + 1, EVERY))
  merged = optax_bema.replay(
      optax_bema.decay_profile(window, NUM_STEPS, shape),
      [(s, jnp.asarray(constant[s], jnp.float32)) for s in [0] + window])
  last, target = _loss(constant[-1]), _loss(decayed[-1])
  loss = _loss(np.asarray(merged, np.float64))
  assert abs(loss - target) <= 0.25 * target, (loss, target, last)
  assert loss < 0.5 * last, (loss, target, last)
