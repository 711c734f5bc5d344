"""What synthesize owes a user who sets the checkpoints up slightly wrong.

The exact model of every target is its profile applied to the whole saved
trajectory (float64 NumPy): the profiles are checked against the reference
loop in ``test_profiles``. The run is SGD on a noisy quadratic, tracked by
``posthoc_ema()``'s defaults.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import catalog

NUM_STEPS = 2000
DIM = 32


@pytest.fixture(scope='module')
def run():
  """Every iterate (float64) and ``(opt_state, params)`` at every step of
  ``snapshot_steps(T, 40)`` and of the sparse sets below."""
  rng = np.random.default_rng(0)
  curvature = jnp.asarray(np.linspace(0.1, 1.0, DIM), jnp.float32)
  tx = optax.chain(optax.sgd(0.05), optax_bema.posthoc_ema())
  keys = jax.random.split(jax.random.PRNGKey(0), NUM_STEPS)

  @jax.jit
  def segment(params, state, keys):
    def body(carry, key):
      p, s = carry
      g = curvature * p + jax.random.normal(key, (DIM,))
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p
    (params, state), iterates = jax.lax.scan(body, (params, state), keys)
    return params, state, iterates

  params = jnp.asarray(rng.normal(size=DIM) * 3, jnp.float32)
  state = tx.init(params)
  thetas, saved = [np.asarray(params, np.float64)], {0: (state, params)}
  done = 0
  wanted = set(optax_bema.snapshot_steps(NUM_STEPS, 40)) | set(
      np.linspace(0, NUM_STEPS, 21).astype(int).tolist()) | {
          NUM_STEPS - 2, NUM_STEPS - 1}
  for step in sorted(wanted - {0}):
    params, state, iterates = segment(params, state, keys[done:step])
    thetas.extend(np.asarray(iterates, np.float64))
    saved[step], done = (state, params), step
  return np.stack(thetas), saved


def exact(target, thetas):
  return optax_bema.profile(target, NUM_STEPS) @ thetas


def relative_errors(result, thetas):
  out = {}
  for name, target in catalog.long_run_targets().items():
    want = exact(target, thetas)
    out[name] = (np.linalg.norm(np.asarray(result.model[name]) - want)
                 / np.linalg.norm(want - thetas[-1]))
  return out


def shifted(snapshot, by):
  """The snapshot of the same run with every weight moved by ``by``: each
  iterate, so each average (their weights sum to 1) and theta_0 too."""
  state, params = snapshot
  move = lambda tree: jax.tree.map(
      lambda x: x + jnp.asarray(by, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  chain_state, averages = state
  return ((chain_state, averages._replace(members=move(averages.members))),
          move(params))


def test_a_shifted_run_synthesizes_the_same_model_shifted(run):
  """Every target of the long-run set: the model of the run shifted by 100
  is the model shifted by 100, to float32's precision at 100."""
  _, saved = run
  steps = optax_bema.snapshot_steps(NUM_STEPS, 40)
  targets = catalog.long_run_targets()
  plain = optax_bema.synthesize(targets, [saved[s] for s in steps])
  moved = optax_bema.synthesize(
      targets, [shifted(saved[s], 100.0) for s in steps])
  ulp = float(np.spacing(np.float32(100.0)))
  for name in targets:
    np.testing.assert_allclose(
        np.asarray(moved.model[name]) - 100.0, plain.model[name],
        atol=16 * ulp, rtol=0, err_msg=name)


def test_a_frozen_leaf_comes_back_exactly():
  """A leaf no update ever moves (a frozen layer under a zero gradient)."""
  tx = optax.chain(optax.adam(0.1), optax_bema.posthoc_ema())
  params = {'live': jnp.linspace(-1.0, 1.0, 5),
            'frozen': jnp.asarray([0.1, 3.7, -1234.5678])}
  state, saved = tx.init(params), []
  saved.append((state, params))
  for step in range(1, 61):
    noise = 0.3 * jnp.sin(step + jnp.arange(5.0))
    grads = {'live': params['live'] - 2.0 + noise, 'frozen': jnp.zeros(3)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if step % 6 == 0 or step > 57:
      saved.append((state, params))
  result = optax_bema.synthesize(
      {'ema': optax_bema.ema(ema_power=0.4, update_freq=1),
       'mean': optax_bema.uniform_profile([50, 55, 60], 60)}, saved)
  for model in result.model.values():
    np.testing.assert_array_equal(model['frozen'], params['frozen'])


def test_the_error_estimate_tracks_the_true_error(run):
  """With the recommended snapshots the estimate is within a factor 3 of
  the true error; with too few it never falls below a third of it, and the
  short averages read as far off (they are)."""
  thetas, saved = run
  for steps, dense in [(optax_bema.snapshot_steps(NUM_STEPS, 40), True),
                       ([0, NUM_STEPS - 2, NUM_STEPS - 1, NUM_STEPS], False),
                       (np.linspace(0, NUM_STEPS, 21).astype(int), False)]:
    result = optax_bema.synthesize(catalog.long_run_targets(),
                                   [saved[int(s)] for s in steps])
    true = relative_errors(result, thetas)
    for name, error in true.items():
      estimate = result.error[name]
      if error > 1e-4:
        assert estimate >= error / 3, (steps[:3], name, error, estimate)
      if dense and error > 1e-4:
        assert estimate <= 3 * error, (name, error, estimate)
    if not dense and len(steps) == 4:
      for name in ('ema 0.4', 'dema 0.6', 'power 0.05'):
        assert true[name] > 0.05 and result.error[name] > 0.05


def test_weights_loaded_after_init_are_refused(run):
  """tx.init on one set of weights, then training from another: the step-0
  snapshot's averages are not its params, and every profile would be off."""
  _, saved = run
  steps = optax_bema.snapshot_steps(NUM_STEPS, 40)
  state, params = saved[0]
  first = (state, params + 1.0)
  with pytest.raises(ValueError, match='tx.init'):
    optax_bema.synthesize(optax_bema.ema(),
                          [first] + [saved[s] for s in steps[1:]])


@pytest.mark.parametrize('scale', [0.5, 2.0])
def test_a_profile_that_does_not_sum_to_one_is_refused(run, scale):
  _, saved = run
  steps = optax_bema.snapshot_steps(NUM_STEPS, 40)
  profile = scale * optax_bema.uniform_profile(steps[-3:], NUM_STEPS)
  with pytest.raises(ValueError, match='sum to 1'):
    optax_bema.synthesize(profile, [saved[s] for s in steps])
  with pytest.raises(ValueError, match='sum to 1'):
    optax_bema.replay(profile, [(s, saved[s][1]) for s in steps])


def test_inputs_in_the_wrong_container_say_what_to_pass(run):
  _, saved = run
  steps = optax_bema.snapshot_steps(NUM_STEPS, 40)
  with pytest.raises(TypeError, match='list\\(snapshots.values\\(\\)\\)'):
    optax_bema.synthesize(optax_bema.ema(), {s: saved[s] for s in steps})
  with pytest.raises(TypeError, match='pass a dict'):
    optax_bema.synthesize([optax_bema.ema(), optax_bema.bema()],
                          [saved[s] for s in steps])
  with pytest.raises(TypeError, match='pair'):
    optax_bema.synthesize(optax_bema.ema(), [saved[s][1] for s in steps])



def test_the_estimate_counts_the_first_gap_from_the_burn_in():
  """theta_0 of a run with a burn-in is the iterate at the burn-in's end
  (step 200 here): a distance D from it to the first snapshot (step 270)
  was covered in 70 steps, not 270, so a drift moved D / 70 per step. The
  residual's weight before the first snapshot, summed (L), meets that
  drift: the estimate is |L| D / 70 (it read |L| D / 270, 0.26 of it, when
  the gap was counted from step 0)."""
  from optax_bema import _fit
  lag, distance = 0.5, 3.0
  solution = _fit.Solution(
      coefficients=np.zeros((1, 2)), residual=np.zeros(1),
      lag_sum=np.array([[lag, 0.0]]), lag_square=np.zeros((1, 2)))
  ends, moved = np.array([270, 300]), np.array([distance ** 2, 0.0])
  for since, steps in [(200, 70), (0, 270)]:
    np.testing.assert_allclose(
        _fit.path_error(solution, ends, moved, since), lag * distance / steps,
        rtol=1e-12)
