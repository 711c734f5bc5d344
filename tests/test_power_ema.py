"""EDM2's power-function EMA, against the paper's own equations.

The references are written from Karras et al. 2024 ("Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3 and Appendix
C), in float64 NumPy, the recursion in the shared reference loop
(``_oracle``): the retention r_t = (1 - 1/t) ** (gamma + 1) per step
(Eq. 127), gamma from the relative standard deviation (Eqs. 123 and 126),
and EDM2's reconstruction from snapshots through the closed-form inner
product of two power-function profiles (Eq. 151).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import _schedule

import _oracle

STDS = (0.02, 0.05, 0.1, 0.2)


def edm2_average(thetas, std, update_freq=1, update_after=0):
  """EDM2's recursion (the reference loop) on theta_0..theta_T: the model
  after every step."""
  return _oracle.trajectory_models('power_ema', thetas, std=std,
                                   update_freq=update_freq,
                                   update_after=update_after)


def trajectory(num_steps, dim=6, seed=0):
  """A random walk with drift: theta_0..theta_T, float32."""
  rng = np.random.default_rng(seed)
  steps = rng.normal(size=(num_steps, dim)) * 0.1 + 0.01
  start = rng.normal(size=(1, dim))
  return np.concatenate([start, start + np.cumsum(steps, 0)]).astype(
      np.float32)


def run_online(transform, thetas, save=()):
  """Feeds theta_1..theta_T to ``transform`` last in a chain (the update
  is theta_t - theta_{t-1}); returns the state after each step, and the
  ``(opt_state, params)`` at the steps in ``save``."""
  tx = optax.chain(optax.identity(), transform)

  @jax.jit
  def step(state, params, theta):
    _, state = tx.update(theta - params, state, params)
    return state

  params = jnp.asarray(thetas[0])
  state = tx.init(params)
  states, saved = [state], [(state, params)] if 0 in save else []
  for t in range(1, len(thetas)):
    theta = jnp.asarray(thetas[t])
    state = step(state, params, theta)
    params = theta
    states.append(state)
    if t in save:
      saved.append((state, params))
  return states, saved


def models(states, thetas, name=None):
  return np.stack([optax_bema.averaged_params(s, jnp.asarray(p), name=name)
                   for s, p in zip(states, thetas)])


# --- (a) online equals EDM2's recursion ------------------------------------


@pytest.mark.parametrize('std', STDS)
def test_gamma_inverts_edm2_std(std):
  gamma = _schedule.gamma_from_std(std)
  assert _oracle.power_std(gamma) == pytest.approx(std, rel=1e-12)
  assert gamma == pytest.approx(_oracle.power_exponent(std), rel=1e-9)
  s = std ** -2  # and it is a root of Eq. 126's cubic
  assert abs(gamma ** 3 + 7 * gamma ** 2 + (16 - s) * gamma + 12 - s) < (
      1e-9 * s * gamma)


@pytest.mark.parametrize('update_freq, update_after', [(1, 0), (3, 0),
                                                       (1, 25), (3, 25)])
@pytest.mark.parametrize('std', STDS)
def test_online_equals_edm2_recursion(std, update_freq, update_after):
  thetas = trajectory(300)
  states, _ = run_online(optax_bema.power_ema(
      std, update_freq=update_freq, update_after=update_after), thetas)
  expected = edm2_average(thetas, std, update_freq, update_after)
  got = models(states, thetas)
  scale = np.abs(thetas).max()
  error = np.abs(got - expected).max() / scale
  print(f'std {std} freq {update_freq} burn-in {update_after}: max error '
        f'{error:.2e} of max |theta|')
  assert error < 2e-6  # measured 0.6-3e-7: float32 rounding


# --- (b) settings that are not a relative width ----------------------------


@pytest.mark.parametrize('std', [0.0, -0.1, math.sqrt(1 / 12), 0.3, 1.0,
                                 float('inf')])
def test_std_out_of_range_is_refused(std):
  with pytest.raises(ValueError, match=r'std must .*lie in \(0, sqrt\(1/12\)'):
    optax_bema.power_ema(std)


def test_std_nan_is_refused():
  with pytest.raises(ValueError, match='std must be a finite number'):
    optax_bema.power_ema(float('nan'))


@pytest.mark.parametrize('std', ['0.1', None, optax.constant_schedule(0.1),
                                 jnp.asarray(0.1)])
def test_std_that_is_not_a_number_is_refused(std):
  with pytest.raises(TypeError, match='power_ema: std must be a number'):
    optax_bema.power_ema(std)


# --- (c) with the post-hoc tools -------------------------------------------


SETTINGS = {'plain': dict(std=0.05),
            'every_3_after_7': dict(std=0.1, update_freq=3, update_after=7)}


@pytest.fixture(scope='module')
def member_run():
  thetas = trajectory(120, seed=1)
  states, _ = run_online(optax_bema.averages(**{
      k: optax_bema.power_ema(**v) for k, v in SETTINGS.items()}), thetas)
  return thetas, states


@pytest.mark.parametrize('name', SETTINGS)
def test_member_of_averages_equals_edm2(member_run, name):
  thetas, states = member_run
  settings = dict(SETTINGS[name])
  expected = edm2_average(thetas, settings.pop('std'), **settings)
  np.testing.assert_allclose(models(states, thetas, name), expected,
                             atol=1e-5)


@pytest.mark.parametrize('name', SETTINGS)
def test_replay_and_profile_equal_online(member_run, name):
  thetas, states = member_run
  stabilizer = optax_bema.power_ema(**SETTINGS[name])
  online = np.asarray(optax_bema.averaged_params(
      states[-1], jnp.asarray(thetas[-1]), name=name))
  replayed = optax_bema.replay(
      stabilizer, [(t, jnp.asarray(p)) for t, p in enumerate(thetas)])
  np.testing.assert_allclose(replayed, online, atol=1e-6)
  weights = optax_bema.profile(stabilizer, len(thetas) - 1)
  np.testing.assert_allclose(weights @ thetas.astype(np.float64), online,
                             atol=1e-5)


def test_synthesize_power_ema_targets():
  thetas = trajectory(400, seed=2)
  save = set(range(0, 401, 10))
  _, snapshots = run_online(
      optax_bema.posthoc_ema(ema_powers=(), stds=(0.05, 0.1)), thetas, save)
  targets = {s: optax_bema.power_ema(s) for s in (0.03, 0.07, 0.1)}
  result = optax_bema.synthesize(targets, snapshots)
  scale = np.abs(thetas[-1] - thetas[-100]).max()
  for s, model in result.model.items():
    expected = edm2_average(thetas, s)[-1]
    error = np.abs(model - expected).max() / scale
    print(f'synthesized std {s}: error {error:.1e} of the last 100 steps\' '
          f'change, residual {result.residual[s]:.1e}')
    # measured 2.4e-4, 1.6e-5 and 7e-7 (0.1 is tracked: exact)
    assert error < {0.03: 2e-3, 0.07: 2e-4, 0.1: 1e-5}[s]


def test_offloaded_equals_on_device():
  thetas = trajectory(60, seed=3)
  got = {}
  for offload in (False, True):
    states, _ = run_online(optax_bema.power_ema(
        0.1, update_freq=2, update_after=5, offload_to_host=offload), thetas)
    got[offload] = models(states, thetas)
  np.testing.assert_array_equal(got[True], got[False])


# --- (d) EDM2's own reconstruction against synthesize ----------------------


def edm2_inner(t_a, g_a, t_b, g_b):
  """EDM2's Eq. 151: <p(t_a, g_a), p(t_b, g_b)> for the continuous
  profiles p(t, g)(tau) = (g + 1) tau ** g / t ** (g + 1) on (0, t]."""
  e = g_b if t_a < t_b else -g_a
  return ((g_a + 1) * (g_b + 1) * (t_a / t_b) ** e
          / ((g_a + g_b + 1) * max(t_a, t_b)))


def edm2_coefficients(snapshots, target):
  """EDM2's solve: A x = b over the (step, gamma) of each snapshot, in
  float64, x normalised to sum 1."""
  a = np.array([[edm2_inner(ta, ga, tb, gb) for tb, gb in snapshots]
                for ta, ga in snapshots])
  b = np.array([edm2_inner(ta, ga, *target) for ta, ga in snapshots])
  x = np.linalg.solve(a, b)
  return x / x.sum()


def test_synthesize_is_no_worse_than_edm2_reconstruction():
  # On one-hot iterates theta_s = e_s, every average IS its profile.
  num_steps, count = 2048, 32
  ends = [num_steps * (i + 1) // count for i in range(count)]
  thetas = np.eye(num_steps + 1, dtype=np.float32)
  tracked = (0.05, 0.1)
  _, snapshots = run_online(
      optax_bema.posthoc_ema(ema_powers=(), stds=tracked), thetas, set(ends))
  # The tracked averages' exact discrete profiles, from EDM2's recursion.
  exact = {s: edm2_average(thetas, s)[ends] for s in tracked}
  basis = [(t, _oracle.power_exponent(s)) for s in tracked for t in ends]
  columns = np.concatenate([exact[s] for s in tracked])
  for std in (0.02, 0.03, 0.07, 0.15):
    target = edm2_average(thetas, std)[-1]
    np.testing.assert_allclose(
        optax_bema.profile(optax_bema.power_ema(std), num_steps), target,
        atol=1e-12)
    x = edm2_coefficients(basis, (num_steps, _oracle.power_exponent(std)))
    edm2 = np.linalg.norm(x @ columns - target) / np.linalg.norm(target)
    model, _, _ = optax_bema.synthesize(optax_bema.power_ema(std), snapshots)
    ours = np.linalg.norm(np.asarray(model, np.float64) - target) / (
        np.linalg.norm(target))
    print(f'std {std}: relative profile error EDM2 {edm2:.3e}, '
          f'synthesize {ours:.3e}')
    assert ours <= edm2 * 1.01 + 1e-5
