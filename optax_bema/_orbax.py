"""Snapshots in an Orbax ``CheckpointManager``: saved beside the resume
checkpoints and never deleted (:func:`snapshot_options`), read back one at
a time, only what synthesis reads (:func:`orbax_snapshots`, by
:func:`restore_only`, which the ``optax-bema`` command reads with too).

orbax-checkpoint is imported here only (and by the command), when one of
these is called, so the core library does not need it.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import numpy as np

from optax_bema import _averages
from optax_bema import _posthoc


def _ocp(what='optax_bema.snapshot_options and orbax_snapshots need'):
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{what} orbax-checkpoint: pip install "optax-bema[orbax]" (or '
        'orbax-checkpoint).') from e
  return ocp


def snapshot_options(num_steps: int, num_snapshots: int, *,
                     save_interval_steps: Optional[int] = None,
                     max_to_keep: Optional[int] = None, **options):
  """Orbax options that save every snapshot step and never delete one.

  Saves at each step ``optax_bema.snapshot_steps(num_steps, num_snapshots)``
  names, and also every ``save_interval_steps`` steps (the checkpoints a run
  resumes from); the latest ``max_to_keep`` checkpoints are kept, as Orbax
  keeps them, and every snapshot step besides, whatever ``max_to_keep``
  says. Orbax's usual
  ``max_to_keep=3`` alone would delete all but the last three snapshots,
  from which only the averages tracked and the last iterate are exact.

  Args:
    num_steps: T, the run's length.
    num_snapshots: as for :func:`~optax_bema.snapshot_steps`.
    save_interval_steps: also save every this many steps (None: only the
      snapshot steps).
    max_to_keep: keep this many of the latest checkpoints besides the
      snapshots (None: keep every checkpoint).
    **options: any other ``orbax.checkpoint.CheckpointManagerOptions``
      argument (``enable_async_checkpointing``, ...).

  Returns:
    An ``orbax.checkpoint.CheckpointManagerOptions``; save with
    ``manager.save(step, args=ocp.args.StandardSave({'params': params,
    'opt_state': opt_state}))`` at every step (the options decide) and read
    with :func:`orbax_snapshots`.

  Raises:
    ImportError: orbax-checkpoint is not installed.
    ValueError: ``options`` that set the save or keep policies themselves.
  """
  ocp = _ocp()
  taken = {'save_decision_policy', 'preservation_policy', 'save_on_steps',
           'should_save_fn', 'keep_period', 'keep_time_interval',
           'best_fn'} & set(options)
  if taken:
    raise ValueError(f'snapshot_options: {sorted(taken)} would decide which '
                     'steps are saved or kept, which these options do; use '
                     'save_interval_steps and max_to_keep.')
  steps = _posthoc.snapshot_steps(num_steps, num_snapshots)
  policies = ocp.checkpoint_managers
  save = policies.SpecificStepsPolicy(steps)
  if save_interval_steps is not None:
    save = policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(save_interval_steps), save])
  keep = None  # Orbax's default: keep every checkpoint
  if max_to_keep is not None:
    keep = policies.AnyPreservationPolicy(
        [policies.LatestN(max_to_keep), policies.CustomSteps(steps)])
  return ocp.CheckpointManagerOptions(
      save_decision_policy=save, preservation_policy=keep, **options)


class OrbaxSnapshots:
  """The ``(opt_state, params)`` snapshots of a ``CheckpointManager``, read
  lazily on each iteration; see :func:`orbax_snapshots`."""

  def __init__(self, manager, like=None, steps=None):
    ocp = _ocp()
    self.steps = sorted(int(s) for s in (
        manager.all_steps() if steps is None else steps))
    if not self.steps:
      raise ValueError(f'orbax_snapshots: no checkpoints in '
                       f'{manager.directory}.')
    naming = getattr(getattr(manager, '_options', None), 'step_name_format',
                     None)
    self._reader = ocp.CheckpointManager(
        manager.directory, item_handlers=ocp.PyTreeCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(read_only=True,
                                             step_name_format=naming))
    # Shapes, dtypes and shardings only: what Orbax restores into.
    self._like = None if like is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, 'sharding', None)),
        like)

  def __len__(self):
    return len(self.steps)

  def __iter__(self):
    for step in self.steps:
      yield self.restore(step)

  def restore(self, step: int) -> tuple[Any, Any]:
    """``(opt_state, params)`` at ``step``: the params and the averages'
    state, the rest of the optimizer state left on disk."""
    ocp = _ocp()
    tree = self._like
    if tree is None:
      tree = self._reader.item_metadata(step)
      tree = getattr(tree, 'tree', tree)
    if not (isinstance(tree, dict) and {'params', 'opt_state'} <= set(tree)):
      raise ValueError(
          f'orbax_snapshots: the checkpoint at step {step} holds '
          f'{sorted(tree) if isinstance(tree, dict) else type(tree)}; save '
          "{'params': params, 'opt_state': opt_state} with "
          'ocp.args.StandardSave.')
    prefixes = [('opt_state',) + p for p in averages_paths(tree['opt_state'])]
    if len(prefixes) != 1:
      raise ValueError(
          f'orbax_snapshots: the optimizer state at step {step} holds '
          f'{len(prefixes)} averages states; it must hold one (train with '
          'optax_bema.posthoc_ema() last in the chain).')

    prefix = prefixes[0]
    restored = restore_only(
        self._reader, step, tree,
        lambda names: names[0] == 'params'
        or tuple(names[:len(prefix)]) == prefix,
        lambda x: _restore_arg(ocp, x))
    return restored['opt_state'], restored['params']


def _restore_arg(ocp, x):
  sharding = getattr(x, 'sharding', None)
  if isinstance(sharding, jax.sharding.Sharding):
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape,
                                dtype=x.dtype)
  return ocp.RestoreArgs(restore_type=np.ndarray)


def key_names(path) -> list:
  """A key path as its dict keys, sequence indices and attribute names."""
  return [next((getattr(k, a) for a in ('key', 'idx', 'name')
                if hasattr(k, a)), k) for k in path]


def restore_only(manager, step: int, tree, keep, restore_arg):
  """The checkpoint of ``manager`` at ``step``, restored only at the leaves
  of ``tree`` (its metadata, or a target) whose key names ``keep`` accepts,
  each by ``restore_arg(leaf)``; the rest stays on disk (Orbax's
  placeholders): what synthesis and the command read of a checkpoint."""
  ocp = _ocp()
  restore_args = jax.tree_util.tree_map_with_path(
      lambda path, x: restore_arg(x) if keep(key_names(path))
      else ocp.PLACEHOLDER, tree)
  item = jax.tree.map(lambda a, x: a if a is ocp.PLACEHOLDER else x,
                      restore_args, tree)
  return manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args))


def averages_paths(tree, path=()) -> list[tuple]:
  """The key names (as :func:`key_names` gives them) of the averages states
  in ``tree``: a target, or a checkpoint's metadata."""
  if _averages.is_averages(tree) or isinstance(tree,
                                               _averages.AveragesState):
    return [path]
  items: Iterable[tuple[Any, Any]]
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = (((getattr(tree, '_fields', None) or range(len(tree)))[i], x)
             for i, x in enumerate(tree))
  else:
    return []
  return [p for k, x in items for p in averages_paths(x, path + (k,))]


def orbax_snapshots(manager, *, like=None, steps=None) -> OrbaxSnapshots:
  """The snapshots a ``CheckpointManager`` holds, for :func:`choose` and
  :func:`~optax_bema.synthesize`.

  A re-iterable: each iteration restores one checkpoint at a time, and only
  what synthesis reads, the params and the averages' state (Adam's moments
  stay on disk), from checkpoints saved with ``ocp.args.StandardSave(
  {'params': params, 'opt_state': opt_state})``. The steps are fixed when
  it is made, so a checkpoint deleted between the two reads synthesis makes
  is an error, not another model. Call it on every process of a multi-host
  run, with ``like`` carrying the shardings so each process reads its own
  shards.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager`` (its directory is
      read; the manager itself is not used).
    like: ``{'params': ..., 'opt_state': ...}`` as saved, arrays or
      ``jax.ShapeDtypeStruct`` with shardings; None restores as NumPy
      arrays on the host, the structure read from the checkpoint.
    steps: the steps to read (default: every saved step).

  Returns:
    An :class:`OrbaxSnapshots` of ``(opt_state, params)`` pairs.

  Raises:
    ImportError: orbax-checkpoint is not installed.
  """
  return OrbaxSnapshots(manager, like, steps)
