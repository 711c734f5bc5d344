"""A directory of Orbax checkpoints, one per step, read one step at a time:
what the ``optax-bema`` command reads and writes. Orbax is imported when a
directory is opened, never by ``import optax_bema``.
"""

from __future__ import annotations

import os
from typing import Sequence

from optax_bema import _orbax


class CheckpointDir:
  """A directory of Orbax checkpoints, read-only, one step at a time."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise ValueError(f'{directory} is not a directory')
    ocp = _orbax._ocp('the optax-bema command needs')
    from absl import logging  # installed with orbax-checkpoint
    logging.set_verbosity(logging.ERROR)  # Orbax's notes are not the user's
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers=ocp.PyTreeCheckpointHandler())
    self.steps = sorted(self._manager.all_steps())
    if not self.steps:
      raise ValueError(f'{directory} holds no Orbax checkpoints')

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._manager.close()

  def end(self, step) -> int:
    if step is None:
      return self.steps[-1]
    if step not in self.steps:
      raise ValueError(f'step {step} was not saved; saved: '
                       f'{describe_steps(self.steps)}')
    return step

  def metadata(self, step: int, keys: Sequence[str]) -> dict:
    """The metadata tree of a step, which must hold every key."""
    tree = self._manager.item_metadata(step).tree
    for key in keys:
      if key not in tree:
        raise ValueError(
            f'the checkpoint at step {step} has no {key!r} (it holds '
            f'{", ".join(map(repr, tree))}); see --params-key and '
            '--state-key')
    return tree

  def read(self, step: int, keys: Sequence[str], keep=None) -> dict:
    """The items ``keys`` of a step, each array on the devices it was saved
    on where they are present (else on the first device); leaves whose key
    names ``keep`` rejects are skipped."""
    import jax
    ocp = self._ocp

    def restore_arg(meta):
      if not hasattr(meta, 'shape'):
        return ocp.RestoreArgs()
      return ocp.ArrayRestoreArgs(sharding=_sharding(meta, jax),
                                  global_shape=meta.shape, dtype=meta.dtype)
    saved = _orbax.restore_only(
        self._manager, step, self.metadata(step, keys),
        lambda names: names[0] in keys and (keep is None or keep(names)),
        restore_arg)
    return {k: saved[k] for k in keys}

  def averages(self, step: int, key: str) -> list[list]:
    """The key paths of the averages states in ``key`` at ``step``, from
    its metadata."""
    tree = self._manager.item_metadata(step).tree.get(key, {})
    return [[key, *p] for p in _orbax.averages_paths(tree)]

  def records(self, step: int, key: str) -> dict:
    """The averages' records at ``step`` (empty if it saved none)."""
    prefixes = self.averages(step, key)
    if len(prefixes) != 1:
      return {}
    settings = prefixes[0] + ['settings']
    saved = self.read(step, [key], keep=lambda names: names[:-1] == settings)
    return dict(_at(saved, settings))

  def describe(self, key: str) -> str:
    import jax
    import numpy as np
    leaves = [x for x in jax.tree.leaves(
        self.metadata(self.steps[-1], [key])[key]) if hasattr(x, 'shape')]
    size = sum(int(np.prod(x.shape)) for x in leaves)
    dtypes = sorted({str(x.dtype) for x in leaves})
    return f'{len(leaves)} arrays, {size:,} values ({", ".join(dtypes)})'


def _at(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _sharding(meta, jax):
  """The saved sharding on the devices present, else the first device."""
  first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if meta.sharding is None:  # saved as a NumPy array
    return first
  try:
    return meta.sharding.to_jax_sharding()
  except ValueError:  # saved on devices this process does not have
    return first


def save(directory: str, tree):
  """Writes ``tree`` as an Orbax checkpoint (restore it with
  ``ocp.StandardCheckpointer().restore(directory)``)."""
  ocp = _orbax._ocp('the optax-bema command needs')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(directory), tree)


def describe_steps(steps: Sequence[int]) -> str:
  """Steps for a message: all of them, or the first and last three."""
  if len(steps) <= 8:
    return ', '.join(map(str, steps))
  return (f'{", ".join(map(str, steps[:3]))}, ..., '
          f'{", ".join(map(str, steps[-3:]))} ({len(steps)} steps)')
