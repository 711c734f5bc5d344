"""EMA, BEMA, DEMA, OUEMA against the float64 reference loop (``_oracle``).

The reference is the BEMA paper's Algorithm 1 and Appendix C (Block and
Zhang 2025, arXiv 2508.00180), one iterate at a time.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import catalog

import _oracle

KINDS = catalog.STABILIZERS


def random_trajectory(steps, seed=0, shape=(5,)):
  """float32 updates of a noisy drift, and the iterates apply_updates makes."""
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=shape).astype(np.float32) + 3.0
  theta0, updates, thetas = theta, [], []
  for _ in range(steps):
    u = (0.05 * rng.normal(size=shape) - 0.02).astype(np.float32)
    updates.append(u)
    theta = theta + u
    thetas.append(theta)
  return theta0, updates, thetas


SETTINGS = [
    dict(update_freq=1),
    dict(update_freq=3, update_after=5),
    dict(update_freq=1, update_after=4, lag=2.0, multiplier=0.5,
         min_ema_multiplier=0.2, ema_power=0.7, bias_power=0.3),
    dict(update_freq=4, lag=1.0, ema_power=1.0),
    dict(update_freq=2, lag=1.0, ema_power=1.0, bias_power=1.0,
         bias_multiplier=0.05),
]


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hp', SETTINGS)
def test_matches_reference_every_step_under_jit(kind, hp):
  theta0, updates, thetas = random_trajectory(40)
  expected = _oracle.models(kind, theta0, thetas, **hp)
  tx = catalog.stabilizer(kind, **hp)
  step = jax.jit(tx.update)
  readout = jax.jit(optax_bema.averaged_params)
  params = jnp.asarray(theta0)
  state = tx.init(params)
  for u, want in zip(updates, expected):
    out, state = step(jnp.asarray(u), state, params)
    np.testing.assert_array_equal(out, u)  # training is never changed
    params = optax.apply_updates(params, out)
    np.testing.assert_allclose(readout(state, params), want,
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_inside_scan_over_a_pytree(kind):
  hp = dict(update_freq=2, update_after=3)
  theta0, updates, thetas = random_trajectory(30, seed=1, shape=(6,))
  expected = _oracle.models(kind, theta0, thetas, **hp)[-1]
  tx = catalog.stabilizer(kind, **hp)
  params = {'a': jnp.asarray(theta0[:2]), 'b': jnp.asarray(theta0[2:])}
  stacked = {'a': jnp.asarray(np.stack(updates)[:, :2]),
             'b': jnp.asarray(np.stack(updates)[:, 2:])}

  def body(carry, u):
    params, state = carry
    u, state = tx.update(u, state, params)
    return (optax.apply_updates(params, u), state), None

  (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), stacked)
  model = optax_bema.averaged_params(state, params)
  got = np.concatenate([model['a'], model['b']])
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_ema_is_bema_with_infinite_bias_power():
  theta0, updates, thetas = random_trajectory(12, seed=2)
  ema_ref = _oracle.models('ema', theta0, thetas, update_freq=1)
  bema_inf = _oracle.models('bema', theta0, thetas, update_freq=1,
                              bias_power=np.inf)
  np.testing.assert_allclose(ema_ref, bema_inf)
  tx = optax_bema.bema(update_freq=1, bias_power=float('inf'))
  params = jnp.asarray(theta0)
  state = tx.init(params)
  for u in updates:
    u, state = tx.update(jnp.asarray(u), state, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_allclose(optax_bema.averaged_params(state, params),
                             ema_ref[-1], rtol=2e-5)


def test_paper_weights_at_known_steps():
  # Table 2 defaults: beta_t = (10 + t) ** -0.5 and alpha_t = (10 + t) ** -0.2;
  # updating every step, the last iterate weighs beta_T in the EMA, beta_T +
  # alpha_T in BEMA, and a floor on beta_t binds once (10 + t) ** -0.5 is
  # below it.
  w = optax_bema.profile(optax_bema.ema(update_freq=1), 90)
  np.testing.assert_allclose(w[90], 0.1, rtol=1e-12)
  w = optax_bema.profile(optax_bema.bema(update_freq=1), 22)
  np.testing.assert_allclose(w[22], 32 ** -0.5 + 32 ** -0.2, rtol=1e-12)
  w = optax_bema.profile(
      optax_bema.ema(update_freq=1, min_ema_multiplier=0.01), 10 ** 6)
  np.testing.assert_allclose(w[-1], 0.01, rtol=1e-12)


# --- where the stabilizer sits ---------------------------------------------


def _train(tx, params, grads_seq):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads_seq:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _grads(n=6, shape=(4,), seed=3):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(n)]


def test_found_in_chain_named_chain_inject_and_multisteps():
  params = jnp.linspace(-1.0, 1.0, 4)
  grads = _grads()
  plain = optax.chain(optax.sgd(0.1), optax_bema.bema(update_freq=1))
  want = optax_bema.averaged_params(*_train(plain, params, grads)[::-1])
  wrapped = [
      optax.named_chain(('sgd', optax.sgd(0.1)),
                        ('avg', optax_bema.bema(update_freq=1))),
      optax.inject_hyperparams(
          lambda learning_rate: optax.chain(
              optax.sgd(learning_rate), optax_bema.bema(update_freq=1)))(
                  learning_rate=0.1),
      optax.MultiSteps(plain, every_k_schedule=1),
  ]
  for tx in wrapped:
    p, s = _train(tx, params, grads)
    np.testing.assert_allclose(optax_bema.averaged_params(s, p), want,
                               rtol=1e-6)


def test_multisteps_averages_the_applied_iterates():
  """Inside MultiSteps(k=2) the stabilizer sees one iterate per 2 mini-steps."""
  k, params = 2, jnp.linspace(-1.0, 1.0, 4)
  grads = _grads(n=12)
  tx = optax.MultiSteps(
      optax.chain(optax.sgd(0.1), optax_bema.dema(update_freq=1)),
      every_k_schedule=k)
  p, s = _train(tx, params, grads)
  iterates, theta = [], np.asarray(params, np.float64)
  for i in range(0, len(grads), k):
    theta = theta - 0.1 * np.mean(np.stack(grads[i:i + k]), axis=0)
    iterates.append(theta)
  want = _oracle.models('dema', params, iterates, update_freq=1)[-1]
  np.testing.assert_allclose(optax_bema.averaged_params(s, p), want,
                             rtol=1e-5, atol=1e-6)


def test_zero_or_several_stabilizers_is_a_clear_error():
  params = jnp.ones(3)
  with pytest.raises(ValueError, match='no averaging state'):
    optax_bema.averaged_params(optax.adamw(1e-3).init(params), params)
  tx = optax.chain(optax.sgd(0.1), optax_bema.ema(), optax_bema.bema())
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'2 averaging states.*opt_state\[1\]'):
    optax_bema.averaged_params(state, params)
  # the way the message says
  np.testing.assert_array_equal(optax_bema.averaged_params(state[2], params),
                                params)


# --- dtypes and memory -----------------------------------------------------


@pytest.mark.parametrize('kind', KINDS)
def test_low_precision_params_average_in_float32(kind):
  params = {'w': jnp.ones(4, jnp.bfloat16), 'h': jnp.ones(2, jnp.float16),
            'step': jnp.array(7, jnp.int32), 'mask': jnp.array([True, False])}
  tx = catalog.stabilizer(kind, update_freq=1)
  state = tx.init(params)
  float_leaves = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  updates = {'w': jnp.full(4, 0.5, jnp.bfloat16),
             'h': jnp.full(2, 0.5, jnp.float16),
             'step': jnp.array(1, jnp.int32), 'mask': jnp.array([False, True])}
  out, state = jax.jit(tx.update)(updates, state, params)
  params = optax.apply_updates(params, out)
  model = optax_bema.averaged_params(state, params)
  assert {k: v.dtype for k, v in model.items()} == {
      k: v.dtype for k, v in params.items()}
  # integer and boolean leaves are never averaged: they are the params'
  np.testing.assert_array_equal(model['step'], params['step'])
  np.testing.assert_array_equal(model['mask'], params['mask'])


def test_accumulator_dtype_is_respected():
  params = jnp.ones(3, jnp.float32)
  state = optax_bema.ema(accumulator_dtype=jnp.bfloat16).init(params)
  assert state.ema.dtype == jnp.bfloat16


COPIES = [('ema', {}, 1), ('dema', {}, 2), ('ouema', {}, 2), ('bema', {}, 3),
          ('bema', {'update_freq': 1}, 2)]


@pytest.mark.parametrize('kind,hp,copies', COPIES)
def test_state_holds_the_minimum_number_of_copies(kind, hp, copies):
  params = {'emb': jnp.ones((64, 16)), 'w': jnp.ones((16, 16)),
            'b': jnp.ones(16, jnp.bfloat16)}
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))  # f32 avgs
  state = catalog.stabilizer(kind, **hp).init(params)
  big = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim > 0)
  small = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim == 0)
  assert big == copies * param_bytes
  assert small <= 16


# --- a non-finite iterate --------------------------------------------------


# Read at every step, before the first update too, where the warning is due.
@pytest.mark.filterwarnings('ignore::optax_bema.NeverUpdatedWarning')
@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('freq', [1, 2])
@pytest.mark.parametrize('bad_value', [np.nan, np.inf])
def test_non_finite_iterate_never_enters_the_average(kind, freq, bad_value):
  theta0, _, thetas = random_trajectory(10, seed=4)
  bad_step = 7  # an update step for both frequencies (update_after=1)
  tx = catalog.stabilizer(kind, update_freq=freq, update_after=1)
  params = jnp.asarray(theta0)
  state = tx.init(params)
  models = []
  for i, theta in enumerate(thetas, 1):
    u = jnp.asarray(theta) - params
    if i == bad_step:
      u = u.at[2].set(bad_value)
    _, state = tx.update(u, state, params)
    if i == bad_step:  # the trainer keeps its finite weights and goes on
      assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
      continue
    params = params + u
    models.append(optax_bema.averaged_params(state, params))
  kept = [th for i, th in enumerate(thetas, 1) if i != bad_step]
  assert int(state.nonfinite_count) == 1
  assert int(state.count) == len(thetas)
  # after the skip, the average continues from its last finite value; the
  # weights of the later updates use their absolute step numbers
  ref_steps = [i for i in range(1, 11) if i != bad_step]
  ref = _oracle.models(kind, theta0, kept, ref_steps, update_freq=freq,
                         update_after=1)
  np.testing.assert_allclose(models, ref, rtol=2e-5, atol=2e-5)


def test_step_counter_saturates():
  tx = optax_bema.bema(update_freq=1)
  params = jnp.ones(3)
  state = tx.init(params)
  state = state._replace(count=jnp.asarray(np.iinfo(np.int32).max - 1,
                                           jnp.int32))
  for _ in range(3):
    _, state = tx.update(jnp.full(3, 0.1), state, params)
    params = params + 0.1
  assert int(state.count) == np.iinfo(np.int32).max
  model = optax_bema.averaged_params(state, params)
  assert np.isfinite(model).all()


# The kinds whose state shows an average that never updated: BEMA's bias
# weight, OUEMA's EMA beside theta_0. EMA's one copy cannot (nor
# power_ema's, EMA's state), nor DEMA's two EMAs (equal after an update
# where beta_t = 1).
SAYS_NEVER_UPDATED = ('bema', 'ouema')


@pytest.mark.parametrize('kind', KINDS)
def test_an_average_that_never_updated_says_so(kind):
  """Updated every 400 steps, read after 300: the model is still the
  weights at init; a read outside jit says so, naming update_freq, where
  the state shows it. Once it has updated, or while a burn-in keeps it at
  the current weights, nothing is said."""
  tx = optax.chain(optax.sgd(0.1), catalog.stabilizer(kind, update_freq=400))
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(p - 2.0, s, p)))
  params = jnp.ones(3)
  state = tx.init(params)
  for _ in range(300):
    params, state = step(params, state)
  with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter('always')
    model = optax_bema.averaged_params(state, params)
  np.testing.assert_array_equal(model, jnp.ones(3))  # theta_0 itself
  said = [w for w in said if w.category is optax_bema.NeverUpdatedWarning]
  assert len(said) == (kind in SAYS_NEVER_UPDATED)
  if said:
    assert 'update_freq' in str(said[0].message)
    assert 'update_after' in str(said[0].message)
  for _ in range(100):
    params, state = step(params, state)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert not np.allclose(optax_bema.averaged_params(state, params), 1.0)
  # A burn-in to step 50, updates every 100 steps after it (150, 250, ...).
  burn_in = optax.chain(optax.sgd(0.1), catalog.stabilizer(
      kind, update_after=50, update_freq=100))
  params = jnp.ones(3)
  state = burn_in.init(params)
  for t in range(1, 101):
    state = burn_in.update(params - 2.0, state, params)[1]
    params = params - 0.1 * (params - 2.0)
    if t == 30:  # in the burn-in: the current weights, nothing to say
      with warnings.catch_warnings():
        warnings.simplefilter('error')
        optax_bema.averaged_params(state, params)
  # Step 100: the weights at step 50, not yet updated, while they moved on.
  with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter('always')
    model = optax_bema.averaged_params(state, params)
  assert not np.allclose(model, params)
  assert len([w for w in said if w.category is
              optax_bema.NeverUpdatedWarning]) == (kind in SAYS_NEVER_UPDATED)
