"""Profiles, replay and post-hoc fitting against the float64 reference loop.

The reference (``_oracle``) runs each stabilizer's online recursion (BEMA
paper, Block and Zhang 2025, arXiv 2508.00180, Algorithm 1 and Appendix C)
on vector iterates; it never forms a profile. A profile is the weight vector
w with model_T = sum_s w_s theta_s. The least-squares fit behind post-hoc
synthesis has no public form of its own, so its tests call it directly.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema
from optax_bema import _fit
from optax_bema import catalog

import _oracle

KINDS = catalog.STABILIZERS
# Burn-in, update_freq > 1 with T not a multiple of it, a floor that binds,
# non-default powers, the bias weight on its own clock; settings 4 and 5
# have beta_t = 1 somewhere, which must wipe out the earlier iterates
# exactly.
SETTINGS = [
    dict(update_freq=1),
    dict(update_freq=3, update_after=5),
    dict(update_freq=4, update_after=7, lag=2.0, multiplier=0.5,
         min_ema_multiplier=0.2, ema_power=0.7, bias_power=0.3),
    dict(update_freq=5, lag=1.0, ema_power=1.0, bias_power=0.5),
    dict(update_freq=1, lag=0.0, ema_power=0.6),
    dict(update_freq=2, update_after=3, ema_power=0.0),
    dict(update_freq=2, lag=1.0, ema_power=1.0, bias_power=1.0,
         bias_multiplier=0.05),
]
WIPES_OUT = (4, 5)  # indices of SETTINGS where beta_t = 1 occurs
NUM_STEPS = 37


@functools.cache
def _stabilizer(kind, settings):
  return catalog.stabilizer(kind, **dict(settings))


def profile(kind, hp, num_steps):
  """The library's profile, through the public ``optax_bema.profile``."""
  return optax_bema.profile(_stabilizer(kind, tuple(sorted(hp.items()))),
                            num_steps)


def read_steps(hp, num_steps):
  """The steps a stabilizer's model at T reads: the last burn-in step a =
  min(update_after, T) (0 without a burn-in) and every update step <= T."""
  after, freq = hp.get('update_after', 0), hp['update_freq']
  return np.asarray([min(after, num_steps)]
                    + list(range(after + freq, num_steps + 1, freq)))


def trajectory(num_steps, seed=0, dim=3):
  """A drifting random walk: theta_0..theta_T as rows."""
  rng = np.random.default_rng(seed)
  steps = 0.3 * rng.normal(size=(num_steps, dim)) + 0.1
  start = rng.normal(size=(1, dim)) + 2.0
  return np.concatenate([start, start + np.cumsum(steps, axis=0)])


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hp', SETTINGS)
def test_profile_replays_the_online_model_after_every_step(kind, hp):
  thetas = trajectory(NUM_STEPS)
  want = _oracle.trajectory_models(kind, thetas, **hp)
  for t in range(NUM_STEPS + 1):
    w = profile(kind, hp, t)
    assert w.shape == (t + 1,)
    np.testing.assert_allclose(w @ thetas[:t + 1], want[t], rtol=1e-12,
                               atol=1e-12, err_msg=f'step {t}')


def test_ema_is_bema_with_infinite_bias_power():
  hp = dict(update_freq=3, update_after=2, ema_power=0.6)
  np.testing.assert_array_equal(
      profile('bema', {**hp, 'bias_power': np.inf}, 50),
      profile('ema', hp, 50))


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hp', SETTINGS)
@pytest.mark.parametrize('num_steps', [0, 4, NUM_STEPS, 1000])
def test_profiles_are_affine(kind, hp, num_steps):
  w = profile(kind, hp, num_steps)
  assert w.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize('hp', SETTINGS[:3])
def test_signs_bema_subtracts_theta0_and_ema_never_goes_negative(hp):
  # Once the EMA has mostly forgotten theta_0, BEMA's correction
  # alpha (theta_t - theta_0) leaves it a negative weight.
  anchor = hp.get('update_after', 0)
  for t in (NUM_STEPS, 1000):
    assert profile('bema', hp, t)[anchor] < 0
    assert (profile('ema', hp, t) >= 0).all()


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hp', SETTINGS)
def test_the_profile_lives_on_the_read_steps(kind, hp):
  for t in (0, 3, 9, NUM_STEPS):
    w = profile(kind, hp, t)
    np.testing.assert_array_equal(np.delete(w, read_steps(hp, t)), 0.0)


@pytest.mark.parametrize('kind, hp', [
    (kind, h) for kind in KINDS for i, h in enumerate(SETTINGS)
    # EDM2's power EMA starts at its first update (beta = 1) under any
    # setting: the step before it is read but weighs nothing.
    if i not in WIPES_OUT and kind != 'power_ema'])
def test_read_steps_are_exactly_what_the_online_model_depends_on(kind, hp):
  """Moving an iterate moves the reference model iff its step is read, and
  ``replay`` from step 0 and the read steps alone gives that model."""
  thetas = trajectory(NUM_STEPS, seed=1)
  want = _oracle.trajectory_models(kind, thetas, **hp)[-1]
  read = set(read_steps(hp, NUM_STEPS).tolist())
  kick = np.random.default_rng(2).normal(size=thetas.shape[1])
  for s in range(NUM_STEPS + 1):
    moved = thetas.copy()
    moved[s] += kick
    got = _oracle.trajectory_models(kind, moved, **hp)[-1]
    if s in read:
      assert np.abs(got - want).max() > 1e-6, f'step {s} is read'
    else:
      np.testing.assert_array_equal(got, want, err_msg=f'step {s} is unread')
  snapshots = [(s, jnp.asarray(thetas[s], jnp.float32))
               for s in sorted(read | {0})]
  np.testing.assert_allclose(
      optax_bema.replay(_stabilizer(kind, tuple(sorted(hp.items()))),
                        snapshots), want, rtol=1e-5, atol=1e-5)


def test_fit_recovers_a_target_in_the_span():
  # BEMA = EMA + alpha (e_T - e_0): exactly in the span of its EMA, e_T, e_0.
  t, hp = 300, dict(update_freq=1, ema_power=0.6, bias_power=0.3)
  one_hot = np.eye(t + 1)
  basis = np.stack(
      [profile('ema', {**hp, 'ema_power': p}, t)
       for p in (0.3, 0.6, 0.9)] + [one_hot[t], one_hot[0]])
  coefficients, residual = _fit.fit(profile('bema', hp, t), basis)
  alpha = (10.0 + t) ** -0.3
  np.testing.assert_allclose(coefficients, [0, 1, 0, alpha, -alpha],
                             atol=1e-9)
  assert residual < 1e-10


@pytest.mark.parametrize('ridge', [0.0, 1e-6])
def test_fit_matches_lstsq_and_reports_its_residual(ridge):
  """The fit is least squares kept to the target's total weight."""
  rng = np.random.default_rng(3)
  basis = rng.normal(size=(6, 40)) * np.logspace(0, 3, 6)[:, None]
  in_span = rng.normal(size=6) @ basis
  outside = rng.normal(size=40)
  targets = np.stack([in_span, outside])
  coefficients, residual = _fit.fit(targets, basis, ridge=ridge)
  want = np.stack([
      _oracle.constrained_lstsq(basis.T, w, basis.sum(axis=1), w.sum())
      for w in targets])
  np.testing.assert_allclose(coefficients @ basis, want @ basis, atol=1e-8)
  np.testing.assert_allclose((coefficients @ basis).sum(axis=1),
                             targets.sum(axis=1), rtol=1e-12)
  np.testing.assert_allclose(
      residual, np.linalg.norm(want @ basis - targets, axis=1)
      / np.linalg.norm(targets, axis=1), atol=1e-9)
  assert residual[0] < 1e-10 and residual[1] > 0.5
  single, single_residual = _fit.fit(outside, basis, ridge=ridge)
  np.testing.assert_allclose(single, coefficients[1])
  assert single_residual == pytest.approx(residual[1])


@pytest.mark.parametrize('ridge', [1e-6, 1e-4])
def test_ridge_is_tikhonov_on_unit_rows(ridge):
  """Two nearly equal tracked EMAs (powers 0.5 and 0.5001), snapshots every
  10 steps: exact least squares needs large, alternating coefficients; the
  ridge is the augmented least-squares problem on unit-norm rows (kept to
  the target's total weight), and it shrinks them."""
  t, hp = 400, dict(update_freq=1)
  basis = np.stack([
      np.pad(profile('ema', {**hp, 'ema_power': p}, s),
             (0, t - s)) for p in (0.5, 0.5001) for s in range(10, t + 1, 10)])
  target = profile('ema', {**hp, 'ema_power': 0.45}, t)
  norms = np.linalg.norm(basis, axis=1)
  unit = basis / norms[:, None]
  lam = ridge * np.linalg.svd(unit, compute_uv=False)[0]
  augmented = np.concatenate([unit.T, lam * np.eye(len(basis))])
  want = _oracle.constrained_lstsq(augmented, np.pad(target, (0, len(basis))),
                           unit.sum(axis=1), target.sum()) / norms
  got, residual = _fit.fit(target, basis, ridge=ridge)
  np.testing.assert_allclose(got @ basis, want @ basis, atol=1e-9)
  # The fit works from inner products alone (float64 normal equations, so
  # that synthesis scales to long runs): the fitted profile agrees to 1e-9,
  # its residual, a difference of nearly equal profiles, to 1e-6 of itself.
  np.testing.assert_allclose(
      residual, np.linalg.norm(want @ basis - target) / np.linalg.norm(target),
      rtol=1e-6)
  exact, _ = _fit.fit(target, basis, ridge=0.0)
  assert np.abs(exact).sum() > 1000
  assert np.linalg.norm(got * norms) <= np.linalg.norm(exact * norms)
  if ridge == 1e-4:
    assert np.abs(got).sum() < 0.2 * np.abs(exact).sum()


def test_linear_time():
  # 1e5 update steps would be 1e10 operations for a step-by-step update of a
  # length-T vector; the closed forms take about 40 ms here (25x slack).
  start = time.perf_counter()
  for kind in KINDS:
    w = profile(kind, dict(update_freq=1), 100_000)
  assert time.perf_counter() - start < 1.0
  assert w.shape == (100_001,)


def test_bad_arguments_are_clear_errors():
  with pytest.raises(TypeError, match='stabilizer'):
    optax_bema.profile(optax.adamw(1e-3), 3)
  with pytest.raises(TypeError, match='stabilizer'):
    optax_bema.profile(optax_bema.pace(1e-3, pullback=0.1, ema_power=0.2), 3)
  with pytest.raises(ValueError, match='num_steps'):
    optax_bema.profile(optax_bema.ema(), -1)
  with pytest.raises(TypeError, match='num_steps'):
    optax_bema.profile(optax_bema.ema(), 2.5)


# Read at every step, before the first update too, where the warning is due.
@pytest.mark.filterwarnings('ignore::optax_bema.NeverUpdatedWarning')
@pytest.mark.parametrize('kind', KINDS)
def test_profile_replays_the_library_transform(kind):
  """The profile applied to the float32 iterates an optax chain produced
  equals ``averaged_params`` of the library's own transform, every step."""
  hp = dict(update_freq=3, update_after=4, lag=2.0, multiplier=0.5,
            min_ema_multiplier=0.15, ema_power=0.7, bias_power=0.3)
  tx = optax.chain(optax.sgd(0.1, momentum=0.5),
                   catalog.stabilizer(kind, **hp))
  step = jax.jit(tx.update)
  rng = np.random.default_rng(4)
  params = jnp.asarray(rng.normal(size=5) + 3.0, jnp.float32)
  state = tx.init(params)
  thetas = [np.asarray(params, np.float64)]
  for t in range(1, 30):
    grads = jnp.asarray(rng.normal(size=5) + 0.5, jnp.float32)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    thetas.append(np.asarray(params, np.float64))
    w = profile(kind, hp, t)
    np.testing.assert_allclose(optax_bema.averaged_params(state, params),
                               w @ np.stack(thetas), rtol=2e-5, atol=2e-5,
                               err_msg=f'step {t}')
