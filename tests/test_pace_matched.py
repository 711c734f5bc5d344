"""PACE's EMA set to an EMA stabilizer's average (the PACE paper's ablation).

The PACE paper's Fig. 2 compares EMA and PACE at the same EMA power, so
the two differ only in the pullback. PACE's weight is
(1 + gamma max(0, t - delay))^-kappa, the stabilizers' (lag + gamma t)^-kappa;
with delay 0 the two agree exactly at lag 1, and at pullback 0 PACE is then
AdamW followed by that EMA. Against the stabilizers' default lag 10 (which
would need delay -9) the weights on the iterates stay close and converge.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

EMA_POWER, UPDATE_FREQ, STEPS = 0.5, 10, 47
MATCHED = dict(ema_power=EMA_POWER, delay=0.0, multiplier=1.0,
               update_freq=UPDATE_FREQ)


def _reference_weights(steps, *, lag, ema_power=EMA_POWER,
                       update_freq=UPDATE_FREQ):
  """w with EMA_T = sum_s w[s] theta_s, by unrolling the recursion in
  float64: beta_t = (lag + t)^-kappa on the steps t that are multiples of
  update_freq."""
  w = np.zeros(steps + 1)
  w[0] = 1.0
  for t in range(update_freq, steps + 1, update_freq):
    beta = (lag + t) ** -ema_power
    w *= 1 - beta
    w[t] += beta
  return w


@functools.lru_cache(maxsize=None)
def _trajectories(pullback):
  """PACE (matched, at ``pullback``) and AdamW + EMA at lag 1 on the same
  gradients of a small least-squares problem: iterates and EMA per step."""
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (32, 5))
  y = jax.random.normal(ky, (32,))
  params = {'w': jnp.zeros(5), 'b': jnp.ones(())}

  def grad(p, t):
    rows = jnp.roll(x, t, 0)[:8], jnp.roll(y, t, 0)[:8]  # minibatch noise
    return jax.grad(lambda p: jnp.mean(
        (rows[0] @ p['w'] + p['b'] - rows[1]) ** 2))(p)

  pace = optax_bema.pace(3e-2, pullback=pullback, weight_decay=0.01,
                         **MATCHED)
  chain = optax.chain(
      optax.adamw(3e-2, weight_decay=0.01),
      optax_bema.ema(ema_power=EMA_POWER, lag=1.0, multiplier=1.0,
                     update_freq=UPDATE_FREQ))
  out = {}
  for name, tx in (('pace', pace), ('chain', chain)):
    p, state, iterates, models = params, tx.init(params), [params], []
    update = jax.jit(tx.update)
    for t in range(STEPS):
      updates, state = update(grad(p, t), state, p)
      p = optax.apply_updates(p, updates)
      iterates.append(p)
      models.append(optax_bema.averaged_params(state, p))
    out[name] = iterates, models
  return out


def test_pullback_zero_is_adamw_then_the_ema_at_lag_one():
  runs = _trajectories(0.0)
  for (pace_p, pace_m), (ema_p, ema_m) in zip(zip(*runs['pace']),
                                              zip(*runs['chain'])):
    for a, b in ((pace_p, ema_p), (pace_m, ema_m)):
      jax.tree.map(lambda u, v: np.testing.assert_allclose(
          u, v, rtol=1e-6, atol=1e-7), a, b)


def test_matched_ema_weighs_the_iterates_as_the_formula_says():
  iterates, models = _trajectories(0.0)['pace']
  w = _reference_weights(STEPS, lag=1.0)
  for leaf in ('w', 'b'):
    stacked = np.stack([np.asarray(p[leaf], np.float64) for p in iterates])
    np.testing.assert_allclose(np.asarray(models[-1][leaf]),
                               np.tensordot(w, stacked, 1), rtol=1e-5,
                               atol=1e-6)


def test_pullback_moves_the_weights_but_not_at_step_one():
  """The pullback acts from step 2 (at step 1 the EMA is theta_0)."""
  pulled, plain = (_trajectories(c)['pace'][0] for c in (0.5, 0.0))
  np.testing.assert_array_equal(pulled[1]['w'], plain[1]['w'])
  assert not np.allclose(pulled[-1]['w'], plain[-1]['w'])


@pytest.mark.parametrize('steps, bound', [(300, 0.02), (1000, 0.003)])
def test_matched_profile_is_close_to_the_default_lag(steps, bound):
  """Against the stabilizers' lag 10 (unreachable: it needs delay -9), the
  profiles' total variation is small and shrinks as training runs."""
  baseline = optax_bema.profile(
      optax_bema.ema(ema_power=EMA_POWER, lag=10.0, multiplier=1.0,
                     update_freq=UPDATE_FREQ), steps)
  np.testing.assert_allclose(baseline, _reference_weights(steps, lag=10.0),
                             atol=1e-12)
  matched = _reference_weights(steps, lag=1.0)
  assert np.abs(matched - baseline).sum() / 2 < bound
