"""posthoc_ema's defaults and snapshot_steps on a long run, against the
online stabilizers.

SGD trains a noisy quadratic (curvatures log-spaced 1 to 1e-3, learning rate
0.1, unit noise, start at 5) for 20000 steps with ``posthoc_ema()`` and the
issue's targets run online by ``optax_bema.averages`` in the same chain; the
tracked averages are saved at ``snapshot_steps(20000, 40)``. Each target's
profile is fitted, in least squares (NumPy), by the tracked averages'
profiles at the snapshots (``optax_bema.profile``), the saved params and
theta_0; the same combination of the saved arrays must land within 2% of
the online model, relative to its distance from theta_T.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import catalog

STEPS = 20_000
DIM = 12


@pytest.fixture(scope='module')
def run():
  """The saved (tracked models, params) at each snapshot step, theta_0,
  the online targets and theta_T."""
  steps = optax_bema.snapshot_steps(STEPS, 40)
  targets = catalog.long_run_targets()
  tx = optax.chain(optax.sgd(0.1), optax_bema.posthoc_ema(),
                   optax_bema.averages(**targets))
  names = [k for k in optax.tree.get(tx.init(jnp.zeros(1))[1], 'members')
           if k != 'initial']
  curvature = jnp.geomspace(1.0, 1e-3, DIM)
  params = jnp.full(DIM, 5.0)
  state = tx.init(params)
  slot = np.full(STEPS + 1, len(steps), np.int32)
  slot[steps] = np.arange(len(steps))
  saved = jnp.zeros((len(steps), len(names) + 1, DIM)).at[0].set(params)
  key = jax.random.key(0)

  def body(carry, xs):
    params, state, saved = carry
    t, at = xs
    grad = curvature * params + jax.random.normal(jax.random.fold_in(key, t),
                                                  (DIM,))
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    row = jnp.stack([optax_bema.averaged_params(state[1], params, name=k)
                     for k in names] + [params])
    return (params, state, saved.at[at].set(row, mode='drop')), None

  (params, state, saved), _ = jax.jit(lambda c, xs: jax.lax.scan(
      body, c, xs))((params, state, saved),
                    (jnp.arange(1, STEPS + 1), slot[1:]))
  online = {k: np.asarray(optax_bema.averaged_params(state[2], params, name=k),
                          np.float64) for k in targets}
  return dict(steps=steps, names=names, saved=np.asarray(saved, np.float64),
              online=online, last=np.asarray(params, np.float64))


def test_defaults_synthesize_the_issue_targets_within_2_percent(run):
  steps, names = run['steps'], run['names']
  rows, arrays = [], []
  for i, s in enumerate(steps):
    for j, name in enumerate(names):
      kind, value = name.split('=')
      tracked = (optax_bema.ema(ema_power=float(value), update_freq=1)
                 if kind == 'ema_power' else optax_bema.power_ema(float(value)))
      rows.append(np.pad(optax_bema.profile(tracked, s), (0, STEPS - s)))
      arrays.append(run['saved'][i, j])
    rows.append(np.eye(1, STEPS + 1, s)[0])  # the params at step s
    arrays.append(run['saved'][i, -1])
  basis, arrays = np.stack(rows), np.stack(arrays)
  norms = np.linalg.norm(basis, axis=1)
  targets = catalog.long_run_targets()
  wanted = np.stack([optax_bema.profile(t, STEPS) for t in targets.values()])
  x = np.linalg.lstsq((basis / norms[:, None]).T, wanted.T, rcond=1e-7)[0]
  models = (x / norms[:, None]).T @ arrays
  errors = {k: np.linalg.norm(m - run['online'][k])
               / np.linalg.norm(run['online'][k] - run['last'])
            for k, m in zip(targets, models)}
  assert max(errors.values()) < 0.02, errors


def test_snapshot_steps_contract():
  for num_steps in (1, 2, 7, 100, 2000, 200_000):
    for count in (1, 2, 3, 10, 40, 500):
      steps = optax_bema.snapshot_steps(num_steps, count)
      assert len(steps) <= count + 1
      assert steps[0] == 0 and steps[-1] == num_steps
      assert all(a < b for a, b in zip(steps, steps[1:]))
      assert all(isinstance(s, int) for s in steps)
  # Enough room: exactly count + 1 steps, the last ones 1, 2, ... from T.
  steps = optax_bema.snapshot_steps(200_000, 40)
  assert len(steps) == 41 and steps[-3:] == [199_998, 199_999, 200_000]


@pytest.mark.parametrize('count, error', [
    (0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
    ('10', TypeError), (None, TypeError)])
def test_snapshot_steps_refuses_nonsense_counts(count, error):
  with pytest.raises(error):
    optax_bema.snapshot_steps(1000, count)
  with pytest.raises(error):
    optax_bema.snapshot_steps(count, 10)
