"""Snapshots in a real Orbax CheckpointManager: snapshot_options keeps every
snapshot step beside interval saves, orbax_snapshots feeds choose, and the
directory Orbax's usual max_to_keep=3 leaves gives no wrong model."""

import subprocess
import sys
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_bema

ocp = pytest.importorskip('orbax.checkpoint')

T = 200
NUM_SNAPSHOTS = 20
TARGET = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def _score(p):
  return jnp.sum((p['w'] - TARGET) ** 2) + jnp.sum(p['b'] ** 2)


def _train(directory, options):
  """Adam on a noisy quadratic, saved each step the options decide; returns
  the manager, every iterate flattened, and the in-memory snapshots."""
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.ones(3)}
  tx = optax.chain(optax.adam(0.05), optax_bema.posthoc_ema())
  state = tx.init(params)

  @jax.jit
  def step(params, state, t):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), t), (4,))
    grads = jax.grad(_score)(params)
    grads = {'w': grads['w'] + noise[0], 'b': grads['b'] + noise[1:]}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  manager = ocp.CheckpointManager(directory, options=options)
  iterates, memory = [params], {}
  for t in range(T + 1):
    if t:
      params, state = step(params, state, t)
      iterates.append(params)
    if manager.save(t, args=ocp.args.StandardSave(
        {'params': params, 'opt_state': state})):
      memory[t] = (state, params)
  manager.wait_until_finished()
  flat = np.stack([np.asarray(jax.flatten_util.ravel_pytree(p)[0],
                              np.float64) for p in iterates])
  return manager, flat, memory, {'params': params, 'opt_state': state}


def test_every_snapshot_kept_beside_interval_saves(tmp_path):
  manager, _, memory, like = _train(tmp_path, optax_bema.snapshot_options(
      T, NUM_SNAPSHOTS, save_interval_steps=30, max_to_keep=2))
  steps = optax_bema.snapshot_steps(T, NUM_SNAPSHOTS)
  kept = list(manager.all_steps())
  assert set(steps) <= set(kept)
  # The latest two checkpoints (what a run resumes from) and the snapshots.
  saved = sorted(set(range(0, T + 1, 30)) | set(steps))
  assert set(kept) == set(steps) | set(saved[-2:])
  snapshots = optax_bema.orbax_snapshots(manager)
  assert snapshots.steps == sorted(kept)
  from_disk = optax_bema.choose(snapshots, _score, progress=False)
  in_memory = optax_bema.choose([memory[s] for s in sorted(kept)], _score,
                                progress=False)
  assert from_disk.name == in_memory.name
  assert from_disk.score == pytest.approx(in_memory.score, rel=1e-6)
  with_target = optax_bema.choose(
      optax_bema.orbax_snapshots(manager, like=like), _score,
      progress=False)
  assert [(r.name, r.score) for r in with_target.table] == [
      (r.name, r.score) for r in from_disk.table]


def test_only_what_synthesis_reads_is_restored(tmp_path):
  manager, _, _, _ = _train(tmp_path, optax_bema.snapshot_options(
      T, 4))
  opt_state, params = optax_bema.orbax_snapshots(manager).restore(T)
  assert set(params) == {'w', 'b'}
  adam = opt_state[0][0]
  assert all(x is ocp.PLACEHOLDER for x in jax.tree.leaves(adam))
  assert set(opt_state[1]['members']) >= {'initial', 'ema_power=0.5'}


def test_the_directory_max_to_keep_3_leaves_gives_no_wrong_model(tmp_path):
  steps = optax_bema.snapshot_steps(T, NUM_SNAPSHOTS)
  manager, flat, _, _ = _train(tmp_path, ocp.CheckpointManagerOptions(
      max_to_keep=3, save_decision_policy=(
          ocp.checkpoint_managers.SpecificStepsPolicy(steps))))
  assert list(manager.all_steps()) == steps[-3:]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    choice = optax_bema.choose(optax_bema.orbax_snapshots(manager), _score,
                               progress=False)
  w = (choice.target if isinstance(choice.target, np.ndarray)
       else optax_bema.profile(choice.target, T))
  exact = w @ flat
  model = np.asarray(jax.flatten_util.ravel_pytree(choice.model)[0])
  assert (np.linalg.norm(model - exact)
          <= 0.02 * np.linalg.norm(exact - flat[T]) + 1e-6)
  assert any('unsupported' in r.flags for r in choice.table)


def test_options_that_decide_saving_are_refused():
  with pytest.raises(ValueError, match='save_interval_steps and max_to_keep'):
    optax_bema.snapshot_options(100, 10, save_on_steps=[5])


def test_without_orbax_the_error_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'orbax.checkpoint', None)
  with pytest.raises(ImportError, match=r'optax-bema\[orbax\]'):
    optax_bema.snapshot_options(100, 10)


def test_import_optax_bema_does_not_import_orbax():
  code = ('import sys, optax_bema; '
          'assert not [m for m in sys.modules if m.split(".")[0] == "orbax"]')
  subprocess.run([sys.executable, '-c', code], check=True)
