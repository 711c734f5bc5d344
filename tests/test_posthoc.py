"""Choosing the average after training, against the online stabilizers.

Every check compares with what training itself computed: the stabilizers run
online in the same chain (``optax_bema.averages``) are the reference for
``profile``, ``replay`` and ``synthesize``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

import _oracle

# Each kind with a burn-in and an update every few steps, as the issue asks.
ONLINE = {
    'ema': optax_bema.ema(update_after=7, update_freq=3),
    'bema': optax_bema.bema(update_after=7, update_freq=3, bias_power=0.3),
    'dema': optax_bema.dema(update_after=7, update_freq=3, ema_power=0.6),
    'ouema': optax_bema.ouema(update_after=7, update_freq=3),
    'bema_every_step': optax_bema.bema(update_freq=1),
    # alpha_t on its own clock: the theory-matched setting for SGD.
    'bema_two_clocks': optax_bema.bema(ema_power=1.0, lag=1.0, bias_power=1.0,
                                       bias_multiplier=0.05, update_freq=2),
    'ouema_two_clocks': optax_bema.ouema(bias_multiplier=0.3, update_freq=2),
}


def quadratic_run(stabilizer, num_steps, *, dim=40, lr=0.1, seed=0,
                  save_every=1):
  """SGD on a noisy quadratic, far from its minimum; returns the final
  state and params and the saved ``(step, params, opt_state)``."""
  curvature = jnp.geomspace(1.0, 0.01, dim)
  tx = optax.chain(optax.sgd(lr), stabilizer)

  @jax.jit
  def step(params, state, key):
    grads = curvature * params + jax.random.normal(key, params.shape)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jnp.full(dim, 5.0)
  state = tx.init(params)
  saved = [(0, params, state)]
  keys = jax.random.split(jax.random.key(seed), num_steps)
  for t in range(1, num_steps + 1):
    params, state = step(params, state, keys[t - 1])
    if t % save_every == 0 or t == num_steps:
      saved.append((t, params, state))
  return params, state, saved


@pytest.fixture(scope='module')
def online_run():
  return quadratic_run(optax_bema.averages(**ONLINE), 50)


def test_averages_members_equal_each_stabilizer_alone(online_run):
  params, state, _ = online_run
  for name, stabilizer in ONLINE.items():
    alone_params, alone_state, _ = quadratic_run(stabilizer, 50)
    np.testing.assert_array_equal(params, alone_params)
    np.testing.assert_array_equal(
        optax_bema.averaged_params(state, params, name=name),
        optax_bema.averaged_params(alone_state, alone_params))


def test_several_averages_need_a_name(online_run):
  params, state, _ = online_run
  with pytest.raises(ValueError, match='7 averaging states.*name='):
    optax_bema.averaged_params(state, params)
  with pytest.raises(ValueError, match="named 'nope'.*'bema'"):
    optax_bema.averaged_params(state, params, name='nope')


def test_profile_applied_to_the_trajectory_is_the_online_model(online_run):
  params, state, saved = online_run
  trajectory = np.stack([np.asarray(p, np.float64) for _, p, _ in saved])
  for name, stabilizer in ONLINE.items():
    weights = optax_bema.profile(stabilizer, len(trajectory) - 1)
    np.testing.assert_allclose(
        weights @ trajectory,
        optax_bema.averaged_params(state, params, name=name),
        rtol=2e-6, atol=2e-6)


def test_replay_from_every_step_equals_online(online_run):
  params, state, saved = online_run
  models = optax_bema.replay(ONLINE, ((s, p) for s, p, _ in saved))
  for name in ONLINE:
    np.testing.assert_allclose(
        models[name], optax_bema.averaged_params(state, params, name=name),
        rtol=1e-6, atol=1e-6)


def test_replay_from_only_the_steps_it_reads(online_run):
  params, state, saved = online_run
  bema = ONLINE['bema']  # reads step 7 (burn-in end) and 10, 13, ..., 49
  kept = [(s, p) for s, p, _ in saved
          if s == 0 or s == 7 or (s > 7 and (s - 7) % 3 == 0)]
  assert kept[-1][0] == 49  # the last update step; step 50 reads nothing
  model = optax_bema.replay(bema, kept)
  np.testing.assert_allclose(
      model, optax_bema.averaged_params(state, params, name='bema'),
      rtol=1e-6, atol=1e-6)


def test_replay_names_the_first_missing_step(online_run):
  _, _, saved = online_run
  gappy = [(s, p) for s, p, _ in saved if s not in (13, 16)]
  with pytest.raises(ValueError, match='reads step 13'):
    optax_bema.replay(ONLINE['bema'], gappy)
  with pytest.raises(ValueError, match='step 0'):
    optax_bema.replay(ONLINE['ema'], [(s, p) for s, p, _ in saved[1:]])
  with pytest.raises(ValueError, match='increasing'):
    optax_bema.replay(ONLINE['ema'], [(0, saved[0][1]), (0, saved[0][1])])


# --- post-hoc synthesis (EDM2's idea, for every stabilizer) ----------------

TARGETS = {  # none of these is tracked by posthoc_ema's defaults
    'ema 0.4': optax_bema.ema(ema_power=0.4, update_freq=1),
    'ema 0.7 lag 50': optax_bema.ema(ema_power=0.7, lag=50.0, update_freq=1),
    'bema 0.5/0.3': optax_bema.bema(ema_power=0.5, bias_power=0.3,
                                    update_freq=1),
    'dema 0.6': optax_bema.dema(ema_power=0.6, update_freq=1),
    'ouema 0.5/0.2': optax_bema.ouema(ema_power=0.5, bias_power=0.2,
                                      update_freq=1),
    'bema every 5': optax_bema.bema(update_freq=5),
}


@pytest.fixture(scope='module')
def posthoc_run():
  """2000 steps with posthoc_ema and, online, every target beside it."""
  # Both pass the updates through, so each sees theta_t as if it were last.
  tracked = optax.chain(optax_bema.posthoc_ema(),
                        optax_bema.averages(**TARGETS))
  params, state, saved = quadratic_run(tracked, 2000, dim=100, save_every=20)
  snapshots = [(s, p) for _, p, s in saved]
  return params, state, snapshots


def _posthoc_part(opt_state):
  """Only the posthoc_ema state, as a user of posthoc_ema alone saves it."""
  return opt_state[1][0]


def test_synthesize_reproduces_untracked_targets(posthoc_run):
  params, state, snapshots = posthoc_run
  saved = [(_posthoc_part(s), p) for s, p in snapshots]
  result = optax_bema.synthesize(TARGETS, saved)
  for name in TARGETS:
    online = np.asarray(optax_bema.averaged_params(state, params, name=name))
    error = (np.linalg.norm(np.asarray(result.model[name]) - online)
             / np.linalg.norm(online - np.asarray(params)))
    allowed = 0.10 if name == 'bema every 5' else 0.05
    assert error <= allowed, (name, error, result.residual[name])
    assert 0 <= result.residual[name] < 1


def test_synthesize_is_exact_for_a_tracked_average(posthoc_run):
  params, state, snapshots = posthoc_run
  saved = [(_posthoc_part(s), p) for s, p in snapshots]
  tracked = optax_bema.ema(ema_power=0.5, update_freq=1)
  online = optax_bema.averaged_params(state, params, name='ema_power=0.5')
  # Exact up to the ridge, which damps the directions it is about: with
  # float32's own precision as the ridge, to that precision.
  result = optax_bema.synthesize(tracked, saved, ridge=1e-6)
  assert result.residual < 1e-6
  np.testing.assert_allclose(result.model, online, rtol=1e-5, atol=1e-5)
  default = optax_bema.synthesize(tracked, saved)
  assert default.residual < 1e-4
  np.testing.assert_allclose(default.model, online, rtol=1e-4, atol=1e-4)


def test_synthesize_refuses_bad_input(posthoc_run):
  _, _, snapshots = posthoc_run
  saved = [(_posthoc_part(s), p) for s, p in snapshots[:5]]
  target = TARGETS['ema 0.4']
  with pytest.raises(ValueError, match='increasing'):
    optax_bema.synthesize(target, saved[::-1])
  with pytest.raises(ValueError, match='tree structure'):
    optax_bema.synthesize(target, saved[:2] + [(saved[2][0], {'w': 1.0})])
  with pytest.raises(ValueError, match='no averages state'):
    optax_bema.synthesize(target, [(optax.sgd(0.1).init(p), p)
                                   for _, p in saved])
  with pytest.raises(TypeError, match='re-iterable'):
    optax_bema.synthesize(target, iter(saved))
  for not_a_stabilizer in (optax_bema.pace(1e-3, pullback=0.1, ema_power=0.2),
                           optax.adamw(1e-3), optax_bema.posthoc_ema()):
    with pytest.raises(TypeError, match='stabilizer'):
      optax_bema.synthesize(not_a_stabilizer, saved)
  with pytest.raises(TypeError, match='stabilizer'):
    optax_bema.replay(optax.adamw(1e-3), [(0, saved[0][1])])


def test_synthesize_refuses_averages_that_skipped_an_iterate():
  tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema())
  params = jnp.ones(3)
  state = tx.init(params)
  snapshots = []
  for t in range(1, 4):
    grads = jnp.full(3, jnp.nan if t == 2 else 0.1)
    updates, state = tx.update(grads, state, params)
    if t != 2:
      params = optax.apply_updates(params, updates)
    snapshots.append((state, params))
  with pytest.raises(ValueError, match='non-finite'):
    optax_bema.synthesize(optax_bema.ema(update_freq=1), snapshots)


def test_posthoc_ema_holds_its_emas_and_theta_0():
  params = {'w': jnp.ones((4, 3)), 'n': jnp.arange(2)}
  state = optax_bema.posthoc_ema(ema_powers=(0.4, 0.8)).init(params)
  sizes = [x.size for x in jax.tree.leaves(state.members) if x.ndim]
  assert sizes == [12] * 3  # two EMAs and theta_0; integer leaves: none
  with pytest.raises(ValueError, match='distinct'):
    optax_bema.posthoc_ema(ema_powers=(0.5, 0.5))


def test_synthesize_reads_snapshots_saved_to_host_memory(posthoc_run):
  """Checkpoints hold NumPy arrays (``jax.device_get``), as Orbax restores."""
  _, _, snapshots = posthoc_run
  saved = [(_posthoc_part(s), p) for s, p in snapshots[:20]]
  target = TARGETS['dema 0.6']
  on_device = optax_bema.synthesize(target, saved)
  on_host = optax_bema.synthesize(target, jax.device_get(saved))
  np.testing.assert_allclose(on_host.model, on_device.model, rtol=1e-6)
  assert on_host.residual == on_device.residual


# --- synthesized_profile: what a synthesis weighs, before training ---------

def test_synthesized_profile_is_the_least_squares_fit():
  """Against NumPy's least squares on the dense profiles (the tracked
  averages at every saved step and the saved params), kept to the target's
  total weight: the fitted weights, the residual, and the coefficients,
  which rebuild those weights."""
  steps = optax_bema.snapshot_steps(300, 8)
  last = steps[-1]
  members = {'ema_power=0.5': optax_bema.ema(ema_power=0.5, update_freq=1),
             'ema_power=0.9': optax_bema.ema(ema_power=0.9, update_freq=1),
             'std=0.1': optax_bema.power_ema(0.1)}
  state = optax_bema.posthoc_ema(ema_powers=(0.5, 0.9), stds=(0.1,)).init(
      jnp.zeros(2))

  def padded(stabilizer, step):
    return np.pad(optax_bema.profile(stabilizer, step), (0, last - step))

  columns = {(name, s): padded(m, s) for name, m in members.items()
             for s in steps}
  columns.update({('params', s): np.eye(last + 1)[s] for s in steps})
  basis = np.stack(list(columns.values()))
  targets = {'dema': optax_bema.dema(ema_power=0.6, update_freq=1),
             'swa': optax_bema.uniform_profile(range(200, last + 1), last)}
  out = optax_bema.synthesized_profile(targets, state, steps, ridge=0.0)
  for k, target in targets.items():
    w = (target if isinstance(target, np.ndarray)
         else optax_bema.profile(target, last))
    fitted = basis.T @ _oracle.constrained_lstsq(basis.T, w,
                                                 basis.sum(axis=1), w.sum())
    np.testing.assert_allclose(out.profile[k], fitted, atol=1e-8)
    assert out.residual[k] == pytest.approx(
        np.linalg.norm(fitted - w) / np.linalg.norm(w), rel=1e-5, abs=1e-9)
    coefficients = dict(out.averages[k])
    coefficients['params'] = out.params[k]
    rebuilt = sum(coefficients[name][steps.index(s)] * column
                  for (name, s), column in columns.items())
    rebuilt[0] += coefficients['initial'][-1]  # theta_0, saved at the last
    np.testing.assert_allclose(rebuilt, out.profile[k], atol=1e-9)
    assert not np.any(coefficients['initial'][:-1])


def test_synthesize_returns_the_synthesized_profile_on_the_iterates():
  _, _, saved = quadratic_run(optax_bema.posthoc_ema(ema_powers=(0.5,)), 60)
  steps = [0, 20, 40, 55, 60]
  snapshots = [(state, p) for t, p, state in saved if t in steps]
  target = optax_bema.bema(ema_power=0.7, update_freq=1)
  model = optax_bema.synthesize(target, snapshots).model
  weights = optax_bema.synthesized_profile(target, snapshots[0][0],
                                           steps).profile
  iterates = np.stack([np.asarray(p, np.float64) for _, p, _ in saved])
  np.testing.assert_allclose(model, weights @ iterates, rtol=1e-5, atol=1e-5)


def test_synthesized_profile_refuses_bad_steps():
  state = optax_bema.posthoc_ema().init(jnp.zeros(2))
  target = optax_bema.ema(update_freq=1)
  with pytest.raises(ValueError, match='increasing'):
    optax_bema.synthesized_profile(target, state, [0, 10, 10])
  with pytest.raises(TypeError):
    optax_bema.synthesized_profile(target, state, [0, 10.0])
  with pytest.raises(ValueError, match='ridge'):
    optax_bema.synthesized_profile(target, state, [0, 10], ridge=-1.0)
