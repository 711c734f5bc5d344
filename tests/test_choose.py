"""choose: the best average the snapshots support, never an unsupported one.

A small MLP trained with Adam keeps every iterate, so the exact model of
any average is its profile applied to them (``optax_bema.profile``), on a
finer grid than choose's own, which choose never sees.
"""

import math
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

T = 300
FAMILIES = {'ema', 'bema', 'dema', 'ouema', 'power_ema', 'mean', 'cosine',
            '1-sqrt', 'tracked', 'last iterate'}


def _data(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(256, 8)).astype(np.float32)
  w = np.random.default_rng(0).normal(size=(8, 1)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.tanh(x @ w))


def _loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] - y) ** 2)


@pytest.fixture(scope='module')
def run():
  """``(snapshots at snapshot_steps(T, 40), every iterate flattened,
  unravel, score)``."""
  x, y = _data(1)
  y = y + 0.3 * jax.random.normal(jax.random.key(2), y.shape)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {'w1': jax.random.normal(k1, (8, 16)) * 0.3, 'b1': jnp.zeros(16),
            'w2': jax.random.normal(k2, (16, 1)) * 0.3}
  tx = optax.chain(optax.adam(1e-2), optax_bema.posthoc_ema())
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), (16,),
                             0, 256)
    grads = jax.grad(_loss)(params, x[idx], y[idx])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  saved = set(optax_bema.snapshot_steps(T, 40))
  snapshots, iterates = {0: (state, params)}, [params]
  for t in range(1, T + 1):
    params, state = step(params, state, t)
    iterates.append(params)
    if t in saved:
      snapshots[t] = (state, params)
  flat = np.stack([np.asarray(jax.flatten_util.ravel_pytree(p)[0],
                              np.float64) for p in iterates])
  unravel = jax.flatten_util.ravel_pytree(params)[1]
  xv, yv = _data(3)
  score = jax.jit(lambda p: _loss(p, xv, yv))
  return snapshots, flat, unravel, score


def _exact(target, flat, num_steps=T):
  w = (np.asarray(target) if isinstance(target, np.ndarray)
       else optax_bema.profile(target, num_steps))
  return w @ flat[:num_steps + 1]


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def _relative(model, target, flat, num_steps=T):
  exact = _exact(target, flat, num_steps)
  return (np.linalg.norm(_flat(model) - exact)
          / np.linalg.norm(exact - flat[num_steps]))


def test_choice_is_near_the_best_of_a_finer_exact_grid(run):
  snapshots, flat, unravel, score = run
  choice = optax_bema.choose(list(snapshots.values()), score,
                             progress=False)
  assert choice.score == float(score(choice.model))
  assert FAMILIES <= {r.family for r in choice.table}
  assert jax.tree.map(lambda x: x.dtype, choice.model) == jax.tree.map(
      lambda x: x.dtype, snapshots[T][1])
  assert _relative(choice.model, choice.target, flat) < 0.02
  # A grid choose never sees, every model exact from every iterate.
  b = optax_bema
  grid = [b.ema(ema_power=p, update_freq=1) for p in np.linspace(
      0.25, 0.95, 15)]
  grid += [b.bema(ema_power=p, bias_power=q, update_freq=1)
           for p in np.linspace(0.3, 0.95, 8) for q in (0.2, 0.4)]
  grid += [b.dema(ema_power=p, update_freq=1) for p in np.linspace(
      0.3, 0.95, 8)]
  grid += [b.ouema(ema_power=p, update_freq=1) for p in np.linspace(
      0.3, 0.95, 8)]
  grid += [b.power_ema(s) for s in np.geomspace(0.005, 0.27, 12)]
  grid += [b.uniform_profile(range(T - w + 1, T + 1), T)
           for w in np.unique(np.geomspace(2, T, 20).astype(int))]
  exact = [float(score(unravel(jnp.asarray(_exact(t, flat), jnp.float32))))
           for t in grid]
  best, last = min(exact), float(score(unravel(jnp.asarray(flat[T],
                                                           jnp.float32))))
  # Within a tenth of what the best average gains over the last iterate.
  assert choice.score - best <= 0.1 * (last - best), (choice.score, best,
                                                     last)


def test_a_thinned_snapshot_set_never_gives_a_wrong_model(run):
  """Orbax's usual max_to_keep=3 leaves the last three snapshots."""
  snapshots, flat, _, score = run
  kept = list(snapshots.values())[-3:]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    choice = optax_bema.choose(kept, score, progress=False)
  assert _relative(choice.model, choice.target, flat) < 0.02
  unsupported = [r for r in choice.table if 'unsupported' in r.flags]
  assert len(unsupported) > len(choice.table) // 2
  assert choice.name not in {r.name for r in unsupported}


def test_a_truncated_run_gives_its_last_steps_model(run):
  snapshots, flat, _, score = run
  steps = [s for s in snapshots if s <= 0.6 * T]
  choice = optax_bema.choose([snapshots[s] for s in steps], score,
                             progress=False, refine=False)
  assert _relative(choice.model, choice.target, flat, steps[-1]) < 0.02


class _Truncated:
  """Every snapshot on the first read, one fewer on the next ones."""

  def __init__(self, snapshots):
    self.snapshots, self.reads = snapshots, 0

  def __iter__(self):
    self.reads += 1
    return iter(self.snapshots if self.reads == 1 else self.snapshots[:-1])


def test_a_truncated_second_read_is_an_error(run):
  snapshots, _, _, score = run
  with pytest.raises(ValueError, match='second read'):
    optax_bema.choose(_Truncated(list(snapshots.values())), score,
                      progress=False)


def test_only_exact_rows_left_is_said_and_chosen_among(run):
  snapshots, _, _, score = run
  with pytest.warns(UserWarning, match='exact rows'):
    choice = optax_bema.choose(list(snapshots.values())[-3:], score,
                               max_error=1e-12, progress=False)
  assert 'exact' in next(r for r in choice.table
                         if r.name == choice.name).flags
  assert 'exact rows' in choice.note and 'exact rows' in str(choice)


def test_never_updated_is_flagged_never_chosen(run, tmp_path):
  """bema() updates every 400 steps: over 300 it returns theta_0, which
  here scores best of all (a score that rewards staying put)."""
  snapshots, _, _, _ = run
  theta_0 = _flat(snapshots[0][1])
  stay = jax.jit(lambda p: jnp.sum(
      (jax.flatten_util.ravel_pytree(p)[0] - theta_0) ** 2))
  choice = optax_bema.choose(
      list(snapshots.values()), stay, progress=False, refine=False,
      candidates={'bema()': optax_bema.bema(), 'ema 0.3': None})
  row = next(r for r in choice.table if r.name == 'bema()')
  assert row.flags == ('never updated',) and math.isnan(row.score)
  assert choice.name != 'bema()'
  assert 'ema 0.3' not in {r.name for r in choice.table}
  choice.plot(tmp_path / 'choice.png')
  assert (tmp_path / 'choice.png').stat().st_size > 0


def test_metrics_maximize_and_a_score_that_cannot_be_traced(run):
  snapshots, _, _, score = run
  calls = []

  def metrics(p):
    value = float(score(p))  # concrete: not traceable
    calls.append(value)
    return {'loss': value, 'accuracy': -value}
  small = {name: None for name in optax_bema.default_candidates(T)
           if not name.startswith('ema ')}
  choice = optax_bema.choose(list(snapshots.values()), metrics,
                             metric='accuracy', maximize=True,
                             candidates=small, progress=False, batch_size=3)
  by_loss = optax_bema.choose(list(snapshots.values()), score,
                              candidates=small, progress=False)
  assert choice.name == by_loss.name
  assert choice.score == -by_loss.score
  assert {'loss', 'accuracy'} == set(choice.table[0].scores)
  with pytest.raises(ValueError, match='metric='):
    optax_bema.choose(list(snapshots.values()), metrics, candidates=small,
                      progress=False)


def _short_run(tx, num_steps):
  """The MLP trained ``num_steps`` steps: ``(every step's (opt_state,
  params), every iterate)``."""
  x, y = _data(1)
  params = {'w1': jax.random.normal(jax.random.key(5), (8, 16)) * 0.3,
            'b1': jnp.zeros(16), 'w2': jnp.zeros((16, 1))}
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(_loss)(p, x, y), s, p)))
  saved, iterates = [(state, params)], [params]
  for _ in range(num_steps):
    params, state = step(params, state)
    saved.append((state, params))
    iterates.append(params)
  return saved, iterates


def test_a_tracked_average_that_never_updated_is_never_chosen():
  """A tracked bema() (every 400 steps) over 60 steps is theta_0, the
  best model by a score that rewards staying put: flagged, not chosen."""
  tx = optax.chain(optax.adam(1e-2), optax_bema.averages(
      fast=optax_bema.ema(update_freq=1), slow=optax_bema.bema()))
  saved, _ = _short_run(tx, 60)
  theta_0 = _flat(saved[0][1])
  stay = jax.jit(lambda p: jnp.sum(
      (jax.flatten_util.ravel_pytree(p)[0] - theta_0) ** 2))
  choice = optax_bema.choose(saved, stay, progress=False, refine=False)
  row = next(r for r in choice.table if r.name == 'tracked slow')
  assert 'never updated' in row.flags and math.isnan(row.score)
  assert choice.name != 'tracked slow'


def test_the_target_of_a_tracked_16_bit_average_replays_its_model():
  """A bfloat16 member stores its deviation from the params; the target
  choose returns for it is the kind itself, so replay over every iterate
  gives the tracked model (to bfloat16's precision), not twice it."""
  tx = optax.chain(optax.adam(1e-2),
                   optax_bema.posthoc_ema(accumulator_dtype=jnp.bfloat16))
  saved, iterates = _short_run(tx, 60)
  want = optax_bema.averaged_params(saved[-1][0], saved[-1][1],
                                    name='ema_power=0.5')
  near = jax.jit(lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree.leaves(p), jax.tree.leaves(want))))
  choice = optax_bema.choose(
      saved, near, progress=False, refine=False,
      candidates={k: None for k in optax_bema.default_candidates(60)})
  assert choice.name == 'tracked ema_power=0.5'
  replayed = optax_bema.replay(choice.target, enumerate(iterates))
  distance = np.linalg.norm(_flat(want) - _flat(iterates[-1]))
  assert np.linalg.norm(_flat(replayed) - _flat(want)) < 0.02 * distance


def test_no_finite_score_at_all_is_a_clear_error(run):
  snapshots, _, _, _ = run
  with pytest.raises(ValueError, match='not finite for any model'):
    optax_bema.choose(list(snapshots.values()), lambda p: jnp.inf,
                      progress=False, refine=False,
                      candidates={'ema 0.3': None})
