"""The Flax examples of the docs (scaling out), run: Linen's TrainState and
nnx.Optimizer.

The averaged model each one evaluates is checked against the float64
reference loop of the BEMA paper's formulas (``_oracle``), applied to the
weights the training loop produced.
"""

from flax import nnx
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_bema

import _oracle

STEPS = 8
LAG, EMA_POWER, BIAS_POWER = 10.0, 0.5, 0.2


def batches(seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(STEPS):
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
         + 0.3 * rng.normal(size=(16, 1)).astype(np.float32))
    yield jnp.asarray(x), jnp.asarray(y)


def reference(trajectory, bias_power=None):
  """Updated every step: EMA, or BEMA when ``bias_power`` is given."""
  kind, extra = ('ema', {}) if bias_power is None else (
      'bema', dict(bias_power=bias_power))
  return _oracle.model_tree(kind, trajectory[0], trajectory[1:],
                            update_freq=1, lag=LAG, ema_power=EMA_POWER,
                            **extra)


def assert_tree_close(actual, expected):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                        atol=1e-6),
               actual, expected)


# --- Linen ------------------------------------------------------------------


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))


def test_linen_train_state_evaluates_the_averaged_model():
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.chain(optax.adamw(1e-2),
                     optax_bema.bema(update_freq=1, lag=LAG,
                                     ema_power=EMA_POWER,
                                     bias_power=BIAS_POWER)))

  def loss_fn(params, x, y):
    return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)

  @jax.jit
  def train_step(state, x, y):
    grads = jax.grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads)

  @jax.jit
  def eval_step(state, x, y):
    averaged = optax_bema.averaged_params(state.opt_state, state.params)
    return loss_fn(averaged, x, y), averaged

  trajectory = [state.params]
  for x, y in batches():
    state = train_step(state, x, y)
    trajectory.append(state.params)
  loss, averaged = eval_step(state, x, y)

  assert int(state.step) == STEPS
  assert np.isfinite(loss)
  assert_tree_close(averaged, reference(trajectory, bias_power=BIAS_POWER))
  assert jax.tree.structure(averaged) == jax.tree.structure(state.params)


# --- NNX --------------------------------------------------------------------


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 8, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def averaged_model(model, optimizer):
  """A copy of ``model`` holding the averaged weights; ``model`` untouched."""
  averaged = optax_bema.averaged_params(
      nnx.as_pure(optimizer.opt_state), nnx.as_pure(nnx.state(model,
                                                              nnx.Param)))
  eval_model = nnx.clone(model)
  nnx.update(eval_model, averaged)
  return eval_model


def test_nnx_optimizer_evaluates_a_copy_with_the_averaged_weights():
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.adamw(1e-2),
                         optax_bema.ema(update_freq=1, lag=LAG,
                                        ema_power=EMA_POWER)),
      wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  live = lambda: nnx.to_pure_dict(nnx.state(model, nnx.Param))
  trajectory = [live()]
  for x, y in batches():
    train_step(model, optimizer, x, y)
    trajectory.append(live())

  before = jax.tree.map(np.array, live())
  eval_model = averaged_model(model, optimizer)
  eval_loss = jnp.mean((eval_model(x) - y) ** 2)

  assert np.isfinite(eval_loss)
  assert_tree_close(nnx.to_pure_dict(nnx.state(eval_model, nnx.Param)),
                    reference(trajectory))
  # the training weights are untouched, and the copy differs from them
  jax.tree.map(np.testing.assert_array_equal, live(), before)
  assert not np.allclose(eval_model.hidden.kernel[...],
                         model.hidden.kernel[...])
  # training goes on from the live weights
  train_step(model, optimizer, x, y)
  assert int(optimizer.step[...]) == STEPS + 1
