"""Smoke test: every transform and its readout, in a few seconds.

Needs only jax, optax, numpy and pytest, so that ``.ci/min_versions`` can run
it in a fresh environment holding exactly the minimum versions of jax, jaxlib
and optax that pyproject.toml declares: the declared bounds stay true.

Each transform is initialised, stepped a few times under ``jit`` on a small
pytree (float32 and bfloat16 leaves), and read out; the readout must have the
params' structure and dtypes, be finite, and agree with the float64
reference loop (``_oracle``, beside this file; no other helper) or an optax
optimizer where that is cheap.
"""

import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest

import optax_bema

import _oracle

STEPS = 8
PARAMS = {'w': jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
          'b': jnp.linspace(0.5, -0.5, 4).astype(jnp.bfloat16)}
# (update_after, update_freq): every step; and a burn-in, then every 3rd.
SCHEDULES = [(0, 1), (2, 3)]
_JAXLIB = tuple(int(re.match(r'\d*', v)[0] or 0)
                for v in jaxlib.__version__.split('.')[:3])


def _grads(params, i):
  return {'w': jnp.sin(3.0 * params['w'] + i),
          'b': jnp.cos(params['b'].astype(jnp.float32) + i).astype(
              jnp.bfloat16)}


def _train(txs, steps=STEPS, grads_fn=_grads):
  """Trains each transform of the dict ``txs`` from ``PARAMS``, in one jit.

  One compilation for them all keeps this test fast. Returns, per name, the
  params after each step (theta_0 first) and the final state.
  """

  @jax.jit
  def step(params, states, i):
    new_params, new_states = {}, {}
    for name, tx in txs.items():
      updates, new_states[name] = tx.update(grads_fn(params[name], i),
                                            states[name], params[name])
      new_params[name] = optax.apply_updates(params[name], updates)
    return new_params, new_states

  params = {name: PARAMS for name in txs}
  states = {name: tx.init(PARAMS) for name, tx in txs.items()}
  trajectories = {name: [PARAMS] for name in txs}
  for i in range(1, steps + 1):
    params, states = step(params, states, jnp.float32(i))
    for name in txs:
      trajectories[name].append(params[name])
  return {name: (trajectories[name], states[name]) for name in txs}


def _as_f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _check_readout(model, params):
  """The params' structure, shapes and dtypes, every element finite."""
  assert jax.tree.structure(model) == jax.tree.structure(params)
  for leaf, p in zip(jax.tree.leaves(model), jax.tree.leaves(params)):
    assert leaf.shape == p.shape
    assert leaf.dtype == p.dtype
    assert np.isfinite(_as_f64(leaf)).all()


def _assert_close(model, expected):
  """float32 leaves to float32 rounding, bfloat16 to bfloat16 rounding."""
  for key, leaf in model.items():
    tol = 1e-5 if leaf.dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(_as_f64(leaf), expected[key], rtol=tol,
                               atol=tol, err_msg=key)


KINDS = ['ema', 'bema', 'dema', 'ouema']


@pytest.fixture(scope='module')
def stabilizer_runs():
  return _train({
      (kind, after, freq): optax.chain(
          optax.adamw(1e-1),
          getattr(optax_bema, kind)(update_after=after, update_freq=freq))
      for kind in KINDS for after, freq in SCHEDULES})


@pytest.mark.parametrize('update_after,update_freq', SCHEDULES)
@pytest.mark.parametrize('kind', KINDS)
def test_stabilizer_after_adamw(stabilizer_runs, kind, update_after,
                                update_freq):
  trajectory, state = stabilizer_runs[kind, update_after, update_freq]
  params = trajectory[-1]

  model = optax_bema.averaged_params(state, params)
  _check_readout(model, params)
  expected = {
      key: _oracle.models(
          kind, _as_f64(trajectory[0][key]),
          [_as_f64(p[key]) for p in trajectory[1:]],
          update_after=update_after, update_freq=update_freq)[-1]
      for key in params}
  _assert_close(model, expected)
  # Under jit, too (the readout's tracer path); XLA may fuse differently.
  _assert_close(jax.jit(optax_bema.averaged_params)(state, params), expected)
  assert int(state[1].count) == STEPS
  assert int(state[1].nonfinite_count) == 0


@pytest.fixture(scope='module')
def offload_runs():
  return _train({
      offload: optax.chain(optax.adamw(1e-1), optax_bema.bema(
          update_after=2, update_freq=3, offload_to_host=offload))
      for offload in (True, False)})


def test_offload_to_host_gives_the_same_model(offload_runs):
  models = {}
  for offload, (trajectory, state) in offload_runs.items():
    models[offload] = optax_bema.averaged_params(state, trajectory[-1])
    _check_readout(models[offload], PARAMS)
  jax.tree.map(np.testing.assert_array_equal, models[True], models[False])


# Before jaxlib 0.10.2, XLA:CPU leaves arrays that jax.device_put sends to
# jax.memory.Space.Host in device memory (their type says host all the same).
@pytest.mark.skipif(
    jax.default_backend() == 'cpu' and _JAXLIB < (0, 10, 2),
    reason='XLA:CPU places arrays in host memory from jaxlib 0.10.2 on')
def test_offload_to_host_places_the_state_in_host_memory(offload_runs):
  _, state = offload_runs[True]
  assert state[1].ema['w'].sharding.memory_kind == 'pinned_host'


@pytest.fixture(scope='module')
def optimizer_runs():
  return _train({
      'pace': optax.chain(
          optax.clip_by_global_norm(1.0),
          optax_bema.pace(1e-2, pullback=0.15, ema_power=0.2)),
      # pullback=0 is AdamW; ema_power=0 makes the EMA the current weights.
      'pace_without_pullback': optax_bema.pace(1e-2, pullback=0.0,
                                               ema_power=0.0),
      'adamw': optax.adamw(1e-2, weight_decay=0.01),
      'adaptive_ademamix': optax.chain(optax_bema.adaptive_ademamix(1e-3),
                                       optax_bema.bema(update_freq=1)),
  })


def test_pace(optimizer_runs):
  trajectory, state = optimizer_runs['pace']
  params = trajectory[-1]
  _check_readout(optax_bema.averaged_params(state, params), params)
  telemetry = jax.jit(optax_bema.pace_telemetry)(state)
  assert 0.0 <= float(telemetry.clipped_fraction) <= 1.0
  assert 0.0 < float(telemetry.mean_gain) <= 1.0


def test_pace_without_pullback_is_adamw(optimizer_runs):
  trajectory, state = optimizer_runs['pace_without_pullback']
  ref_trajectory, _ = optimizer_runs['adamw']
  for ours, ref in zip(trajectory, ref_trajectory):
    jax.tree.map(np.testing.assert_array_equal, ours, ref)
  model = optax_bema.averaged_params(state, trajectory[-1])
  jax.tree.map(np.testing.assert_array_equal, model, trajectory[-1])
  assert float(optax_bema.pace_telemetry(state).mean_gain) == 0.0


def test_pace_telemetry_known_value():
  tx = optax_bema.pace(1.0, pullback=1.0, ema_power=0.0)

  @jax.jit
  def clipped_fraction(params, grads):
    _, state = tx.update(grads, tx.init(params), params)
    return optax_bema.pace_telemetry(state).clipped_fraction

  assert float(clipped_fraction(jnp.zeros(2), jnp.array([4.0, 0.5]))) == 0.5


def test_adaptive_ademamix_under_bema(optimizer_runs):
  trajectory, state = optimizer_runs['adaptive_ademamix']
  params = trajectory[-1]
  _check_readout(optax_bema.averaged_params(state, params), params)
  assert 4.0 <= float(state[0][-3].alpha) <= 8.0


def test_adaptive_ademamix_constant_gradient_is_ademamix():
  """A constant gradient has no noise: alpha stays 4, plain AdEMAMix."""
  runs = _train(
      {'adaptive': optax_bema.adaptive_ademamix(1e-2),
       'ademamix': optax.chain(
           optax.clip_by_global_norm(1.0), optax.contrib.ademamix(
               1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=4.0, eps=1e-8,
               weight_decay=0.01))},
      grads_fn=lambda params, i: jax.tree.map(
          lambda p: jnp.full_like(p, 0.3), params))
  (trajectory, state), (ref_trajectory, _) = runs['adaptive'], runs['ademamix']
  assert float(state[-3].noise_fraction) == 0.0
  for ours, ref in zip(trajectory, ref_trajectory):
    for key in ours:
      np.testing.assert_allclose(_as_f64(ours[key]), _as_f64(ref[key]),
                                 rtol=1e-6, atol=1e-7, err_msg=key)
