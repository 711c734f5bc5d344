"""PACE against a float64 numpy loop, and against AdamW.

The loop is the update of Au and Block (2026), "Training for the Model You
Return", line by line: AdamW with decoupled weight decay, then the live
weights pulled toward their EMA by lam = min(lr_t pullback decay_t / D, 1)
per coordinate (D Adam's denominator, the EMA from before this step's
update), decay_t = max((1 + multiplier max(0, t - delay))^-ema_power, 1e-4),
and the EMA updated every ``update_freq`` steps with weight decay_t.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

N = 64
STEPS = 40


def reference_pace(theta0, grad_fn, lr_fn, steps, *, b1=0.9, b2=0.999,
                   eps=1e-8, weight_decay=0.01, pullback, ema_power,
                   delay=0.0, multiplier=1.0, update_freq=1,
                   clip_pullback=True):
  """PACE's update, line by line, in float64; returns thetas, emas, clipped
  shares."""
  theta = np.asarray(theta0, np.float64).copy()
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  ema = theta.copy()
  last_ema_step = 0
  thetas, emas, clipped = [], [], []
  for t in range(1, steps + 1):
    g = grad_fn(t, theta)
    lr = lr_fn(t - 1)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat = m / (1 - b1**t)
    d = np.sqrt(v / (1 - b2**t)) + eps
    before = theta.copy()
    theta = theta - lr * weight_decay * theta
    theta = theta - lr * m_hat / d
    decay = max((1 + multiplier * max(0.0, t - delay)) ** (-ema_power), 1e-4)
    lam = lr * pullback * decay / d
    clipped.append(np.mean(lam >= 1))
    if clip_pullback:
      lam = np.minimum(lam, 1.0)
    theta = theta + lam * (ema - before)
    if (t - last_ema_step) % update_freq == 0:
      ema = (1 - decay) * ema + decay * theta
      last_ema_step = t
    thetas.append(theta.copy())
    emas.append(ema.copy())
  return np.array(thetas), np.array(emas), np.array(clipped)


def noisy_quadratic(gradient_scale, seed=0):
  """g = scale * (h (theta - target) + noise), per coordinate."""
  rng = np.random.default_rng(seed)
  curvature = rng.uniform(0.5, 2.0, N)
  target = rng.normal(size=N)
  noise = rng.normal(size=(STEPS + 1, N))

  def grad(t, theta):
    return gradient_scale * (curvature * (theta - target) + 0.5 * noise[t])
  return grad


def run(tx, grad_fn, params, steps=STEPS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  thetas, emas, states = [], [], []
  for t in range(1, steps + 1):
    grads = jnp.asarray(grad_fn(t, np.asarray(params, np.float64)),
                        params.dtype)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    thetas.append(np.asarray(params, np.float64))
    emas.append(np.asarray(optax_bema.averaged_params(state, params),
                           np.float64))
    states.append(state)
  return np.array(thetas), np.array(emas), states


def pace_state(state):
  return state if isinstance(state, optax_bema.PaceState) else state[-1]


THETA0 = np.random.default_rng(1).normal(size=N)
SMALL = np.concatenate([np.full(N // 8, 1.0), np.full(N - N // 8, 1e-4)])


@pytest.mark.parametrize(
    'case, scale, kwargs, clipped_range',
    [
        ('almost none clipped', 1.0,
         dict(learning_rate=1e-2, pullback=0.15, ema_power=0.2),
         (0.0, 0.02)),
        ('most clipped', SMALL,
         dict(learning_rate=1e-2, pullback=0.5, ema_power=0.2,
              weight_decay=0.1),
         (0.8, 0.9)),
        ('update_freq 3 and a delay', 1.0,
         dict(learning_rate=3e-2, pullback=2.0, ema_power=0.5,
              update_freq=3, delay=4.0, multiplier=0.5),
         (0.0, 1.0)),
        ('no clipping', 1.0,
         dict(learning_rate=1e-2, pullback=0.3, ema_power=0.3,
              clip_pullback=False),
         (0.0, 0.02)),
    ])
def test_matches_the_spec_loop(case, scale, kwargs, clipped_range):
  del case
  grad_fn = noisy_quadratic(scale)
  kwargs = dict(kwargs)
  lr = kwargs.pop('learning_rate')
  want_theta, want_ema, want_clipped = reference_pace(
      THETA0, grad_fn, lambda count: lr, STEPS, **kwargs)
  theta, ema, states = run(optax_bema.pace(lr, **kwargs), grad_fn,
                           jnp.asarray(THETA0, jnp.float32))
  np.testing.assert_allclose(theta, want_theta, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ema, want_ema, rtol=2e-5, atol=2e-5)
  clipped = np.array([float(optax_bema.pace_telemetry(s).clipped_fraction)
                      for s in states])
  np.testing.assert_allclose(clipped, want_clipped, atol=1.5 / N)
  low, high = clipped_range
  assert low <= clipped[-1] <= high
  assert low <= want_clipped[-1] <= high


def test_matches_the_spec_loop_with_a_schedule_in_a_chain():
  peak, warmup = 2e-2, 10
  schedule = optax.linear_schedule(0.0, peak, warmup)
  grad_fn = noisy_quadratic(1.0, seed=3)
  hyper = dict(pullback=1.0, ema_power=0.3, update_freq=2)
  want_theta, want_ema, _ = reference_pace(
      THETA0, grad_fn, lambda count: peak * min(count / warmup, 1.0), STEPS,
      **hyper)
  theta, ema, _ = run(optax.chain(optax.identity(),
                                  optax_bema.pace(schedule, **hyper)),
                      grad_fn, jnp.asarray(THETA0, jnp.float32))
  np.testing.assert_array_equal(theta[0], THETA0.astype(np.float32))
  np.testing.assert_allclose(theta, want_theta, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ema, want_ema, rtol=2e-5, atol=2e-5)


def test_pullback_is_exactly_zero_at_step_one():
  params = jnp.asarray(THETA0, jnp.float32)
  grads = jnp.asarray(noisy_quadratic(1.0)(1, THETA0), jnp.float32)
  tx = optax_bema.pace(1e-2, pullback=50.0, ema_power=0.0,
                       clip_pullback=False)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  adamw = optax.adamw(1e-2, weight_decay=0.01)
  want, _ = adamw.update(grads, adamw.init(params), params)
  np.testing.assert_array_equal(updates, want)
  # The gain was large; the pullback was zero because ema - theta was.
  assert float(optax_bema.pace_telemetry(state).mean_gain) > 1.0


@pytest.mark.parametrize('schedule', [False, True])
def test_zero_pullback_is_adamw_exactly(schedule):
  lr = optax.cosine_decay_schedule(1e-2, STEPS) if schedule else 1e-2
  params = {'w': jnp.asarray(THETA0[:48].reshape(6, 8), jnp.float32),
            'b': jnp.asarray(THETA0[48:], jnp.float32)}
  mask = {'w': True, 'b': False}
  tx = optax_bema.pace(lr, b1=0.8, b2=0.99, weight_decay=0.1, pullback=0.0,
                       ema_power=0.5, mask=mask)
  adamw = optax.adamw(lr, b1=0.8, b2=0.99, weight_decay=0.1, mask=mask)
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(p['w'])) + jnp.sum(p['b'] ** 2))
  got, want = params, params
  state, adamw_state = tx.init(params), adamw.init(params)
  update, adamw_update = jax.jit(tx.update), jax.jit(adamw.update)
  for _ in range(25):
    updates, state = update(grad(got), state, got)
    got = optax.apply_updates(got, updates)
    updates, adamw_state = adamw_update(grad(want), adamw_state, want)
    want = optax.apply_updates(want, updates)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert float(optax_bema.pace_telemetry(state).mean_gain) == 0.0
  ema = optax_bema.averaged_params(state, got)  # the paper's "EMA" baseline
  assert not np.allclose(ema['w'], got['w'])


def test_injected_zero_pullback_is_injected_adamw_exactly():
  grad_fn = noisy_quadratic(1.0, seed=6)
  params = jnp.asarray(THETA0, jnp.float32)
  got, _, _ = run(optax.inject_hyperparams(optax_bema.pace)(
      1e-2, pullback=0.0, ema_power=0.5), grad_fn, params, steps=15)
  want, _, _ = run(optax.chain(
      optax.inject_hyperparams(optax.adamw)(1e-2, weight_decay=0.01),
      optax_bema.ema(update_freq=1)), grad_fn, params, steps=15)
  np.testing.assert_array_equal(got, want)


def test_bfloat16_params_keep_float32_moments_and_ema():
  params = {'w': jnp.asarray(THETA0[:8], jnp.bfloat16)}
  tx = optax_bema.pace(1e-2, pullback=0.2, ema_power=0.2)
  state = tx.init(params)
  _, state = jax.jit(tx.update)({'w': jnp.ones(8, jnp.bfloat16)}, state,
                                params)
  adam = optax.tree.get(state.adamw, 'ScaleByAdamState')
  for tree in (adam.mu, adam.nu, state.ema):
    assert tree['w'].dtype == jnp.float32



def test_state_keeps_its_dtypes_under_a_narrower_accumulator():
  params = {'w': jnp.asarray(THETA0[:8], jnp.float32)}
  tx = optax_bema.pace(1e-2, pullback=0.2, ema_power=0.2,
                       accumulator_dtype=jnp.bfloat16)
  state = tx.init(params)
  _, stepped = jax.jit(tx.update)({'w': jnp.ones(8)}, state, params)
  dtypes = lambda s: jax.tree.map(lambda x: x.dtype, s)
  assert dtypes(stepped) == dtypes(state)
  assert optax.tree.get(stepped, 'mu')['w'].dtype == jnp.bfloat16

def test_telemetry_is_a_device_scalar():
  tx = optax_bema.pace(1.0, pullback=1.0, ema_power=0.0)
  params = jnp.zeros(4)
  _, state = jax.jit(tx.update)(jnp.array([4.0, -2.0, 1e-9, 0.0]),
                                tx.init(params), params)
  telemetry = jax.jit(optax_bema.pace_telemetry)(state)
  assert isinstance(telemetry.clipped_fraction, jax.Array)
  assert telemetry.clipped_fraction.shape == ()
  # Step 1: D = |g| + eps and the gain is lr * pullback / D = 1 / D.
  assert float(telemetry.clipped_fraction) == 0.5
  np.testing.assert_allclose(float(telemetry.mean_gain),
                             (0.25 + 0.5 + 1 + 1) / 4, rtol=1e-5)


class TestStabilizerSpelling:
  """The stabilizer-style spelling fails at once, showing the right one."""

  RIGHT = r'optax_bema\.pace\(1e-3, pullback'

  def test_without_a_learning_rate_at_construction(self):
    with pytest.raises(TypeError, match=self.RIGHT):
      optax.chain(optax.adamw(1e-3),
                  optax_bema.pace(pullback=0.15, ema_power=0.2))

  def test_given_an_optimizer_instead_of_a_rate(self):
    with pytest.raises(TypeError, match=self.RIGHT):
      optax_bema.pace(optax.adamw(1e-3), pullback=0.15, ema_power=0.2)

  def test_gradient_processing_before_pace_is_fine(self):
    tx = optax.chain(optax.zero_nans(), optax.clip_by_global_norm(1.0),
                     optax_bema.pace(1e-3, pullback=0.15, ema_power=0.2),
                     optax_bema.ema(update_freq=1))
    params = {'w': jnp.ones(3), 'b': jnp.zeros(())}
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)({'w': jnp.ones(3), 'b': jnp.ones(())},
                                    state, params)
    assert updates['w'].shape == (3,)


def test_telemetry_without_clipping_and_without_pace():
  tx = optax_bema.pace(1.0, pullback=1.0, ema_power=0.0, clip_pullback=False)
  params = jnp.zeros(2)
  _, state = tx.update(jnp.array([4.0, 0.5]), tx.init(params), params)
  telemetry = optax_bema.pace_telemetry(state)
  # D = |g| + eps at step 1: the unclipped gains are 1/4 and 2.
  assert float(telemetry.clipped_fraction) == 0.5
  np.testing.assert_allclose(float(telemetry.mean_gain), (0.25 + 2) / 2,
                             rtol=1e-5)
  with pytest.raises(ValueError, match='no PaceState'):
    optax_bema.pace_telemetry(optax.adamw(1e-3).init(params))
