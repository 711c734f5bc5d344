"""The checks every reader of saved snapshots makes: one layout, increasing
steps, finite values (replay and synthesis alike)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_bema import _tree


def check_next(layout, params, last: int, step: int, caller: str):
  """The snapshots' tree structure and leaf shapes stay the same, and steps
  increase; returns the layout to compare the next snapshot with."""
  paths, structure = jax.tree_util.tree_flatten_with_path(params)
  now = (structure, [(jnp.shape(x), jnp.result_type(x)) for _, x in paths])
  if layout is not None and now[0] != layout[0]:
    raise ValueError(f'{caller}: the snapshot at step {step} has another '
                     f'tree structure than the earlier ones.')
  if layout is not None and now[1] != layout[1]:
    i = next(i for i, (a, b) in enumerate(zip(now[1], layout[1])) if a != b)
    (shape, dtype), (was, was_dtype) = now[1][i], layout[1][i]
    raise ValueError(
        f'{caller}: the snapshot at step {step} has leaf '
        f'{jax.tree_util.keystr(paths[i][0])} of shape {shape} and dtype '
        f'{dtype}, the earlier ones {was} and {was_dtype}: every snapshot '
        'must come from the same model.')
  if step <= last:
    # Two snapshots with one count: saved at loop steps that were not
    # optimizer updates.
    cause = (' Two snapshots carry the same count: under optax.MultiSteps '
             '(gradient accumulation) or apply_if_finite a loop step is not '
             'an optimizer update; save once per update, labelled with the '
             "stabilizer's count." if step == last else '')
    raise ValueError(f'{caller}: snapshots must be in increasing step order; '
                     f'step {step} came after step {last}.{cause}')
  return now


# Compiled once per layout: run eagerly, the test's branch is rebuilt on
# every call (a tenth of a second per snapshot and average).
_all_finite = jax.jit(lambda tree: _tree.all_finite(
    _tree.as_accumulator(tree, None)))


def require_finite(tree, what: str):
  """``ValueError`` naming ``what`` when a leaf of ``tree`` is not finite."""
  if not bool(_all_finite(tree)):
    raise ValueError(
        f'{what} are not all finite: this snapshot cannot give a finite '
        'model. Leave it out (and the steps it covers: save another '
        'checkpoint), or take an earlier one.')
