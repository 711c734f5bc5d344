"""The float64 reference loop (``_oracle``) against closed forms of its own.

The library's tests trust the reference, so it is checked here against
statements that need no loop: a running mean, EDM2's standard deviation
formula, and BEMA's limits.
"""

import math

import numpy as np
import pytest

import _oracle


def iterates(num_steps, seed=0, dim=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(num_steps + 1, dim)).cumsum(axis=0)


@pytest.mark.parametrize('std', [0.01, 0.05, 0.1, 0.2, 0.28])
def test_power_exponent_inverts_edm2_std(std):
  """EDM2 (Karras et al. 2024), std = sqrt((g + 1) / ((g + 2)^2 (g + 3)))."""
  g = _oracle.power_exponent(std)
  assert g > -1
  assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(
      std, rel=1e-10)


def test_power_exponent_known_values():
  # std^2 = 1/12: the cubic is g (g^2 + 7 g + 4), largest root 0 (a uniform
  # average); EDM2's std 0.05 and 0.10 give gamma of about 16.97 and 6.94.
  assert _oracle.power_exponent(math.sqrt(1 / 12)) == pytest.approx(
      0.0, abs=1e-9)
  assert _oracle.power_exponent(0.05) == pytest.approx(16.97, abs=0.01)
  assert _oracle.power_exponent(0.10) == pytest.approx(6.94, abs=0.01)


@pytest.mark.parametrize('update_after', [0, 4])
def test_ema_with_weight_one_over_t_is_the_running_mean(update_after):
  """beta_t = 1/t (lag 0, power 1): the mean of theta_1..theta_t; a burn-in
  up to step a leaves theta_a in it as theta_0, weighing a/t."""
  thetas = iterates(12)
  got = _oracle.trajectory_models('ema', thetas, ema_power=1.0, lag=0.0,
                                  update_freq=1, update_after=update_after)
  for t in range(update_after + 1, 13):
    a = update_after
    want = (a * thetas[a] + thetas[a + 1:t + 1].sum(axis=0)) / t
    np.testing.assert_allclose(got[t], want, rtol=1e-12)


@pytest.mark.parametrize('update_freq,update_after', [(1, 0), (3, 2)])
def test_power_ema_with_gamma_zero_is_the_mean_since_the_burn_in(
    update_freq, update_after):
  """r = 1 - 1/n on the n-th update: the mean of the update steps' iterates;
  between update steps the model holds."""
  thetas = iterates(20, seed=1)
  got = _oracle.trajectory_models(
      'power_ema', thetas, std=math.sqrt(1 / 12), update_freq=update_freq,
      update_after=update_after)
  read = []
  for t in range(update_after + 1, 21):
    if (t - update_after) % update_freq == 0:
      read.append(thetas[t])
    want = np.mean(read, axis=0) if read else thetas[update_after]
    np.testing.assert_allclose(got[t], want, rtol=1e-12, atol=1e-12)


def test_bema_is_ema_plus_its_bias_term_and_ema_at_infinite_power():
  thetas = iterates(9, seed=2)
  hp = dict(update_freq=2, update_after=3, bias_multiplier=0.3)
  ema = _oracle.trajectory_models('ema', thetas, **hp)
  bema = _oracle.trajectory_models('bema', thetas, bias_power=0.4, **hp)
  # Update steps 5, 7, 9; theta_0 is theta_3 after the burn-in.
  for t, last in [(5, 5), (6, 5), (9, 9)]:
    alpha = (10.0 + 0.3 * last) ** -0.4
    np.testing.assert_allclose(
        bema[t], ema[t] + alpha * (thetas[last] - thetas[3]), rtol=1e-12)
  np.testing.assert_array_equal(
      _oracle.trajectory_models('bema', thetas, bias_power=math.inf, **hp),
      ema)


def test_dema_and_ouema_one_update_by_hand():
  thetas = iterates(1, seed=3)
  t0, t1 = thetas
  beta = 11.0 ** -0.5
  e1 = (1 - beta) * t0 + beta * t1
  e2 = (1 - beta) * t0 + beta * e1
  np.testing.assert_allclose(
      _oracle.trajectory_models('dema', thetas, update_freq=1)[1],
      2 * e1 - e2, rtol=1e-12)
  p = (1 + 0.5) ** -0.2  # bias_multiplier 0.5 moves p_t, not beta_t
  np.testing.assert_allclose(
      _oracle.trajectory_models('ouema', thetas, update_freq=1,
                                bias_multiplier=0.5)[1],
      (1 - beta) * t0 + beta * (t1 - p * t0) / (1 - p), rtol=1e-12)


def test_floor_binds():
  thetas = iterates(3, seed=4)
  got = _oracle.trajectory_models('ema', thetas, update_freq=1,
                                  min_ema_multiplier=0.5)
  want = thetas[0]
  for t in range(1, 4):
    want = 0.5 * want + 0.5 * thetas[t]
  np.testing.assert_allclose(got[-1], want, rtol=1e-12)


def test_settings_are_checked():
  with pytest.raises(TypeError, match='ema_pwer'):
    _oracle.models('ema', np.zeros(2), [np.ones(2)], ema_pwer=0.5)
  with pytest.raises(TypeError, match='std'):
    _oracle.models('power_ema', np.zeros(2), [np.ones(2)], std=None)
  # Another kind's setting is ignored, so one sweep serves every kind.
  np.testing.assert_array_equal(
      _oracle.models('power_ema', np.zeros(2), [np.ones(2)], bias_power=0.2),
      _oracle.models('power_ema', np.zeros(2), [np.ones(2)]))
