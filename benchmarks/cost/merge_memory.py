"""How much memory does merging k checkpoints of a sharded run hold?

A weight matrix split over every device (on CPU, 4 host devices by
default), k checkpoints restored one at a time the way Orbax restores them
(each device reads its own shard), merged with ``optax_bema.replay`` and
``decay_profile`` weights. Measured per device: the bytes of the live
arrays each time a checkpoint is about to be read and once it is, as a
multiple of one checkpoint's shard; and the process' peak resident memory.

  python benchmarks/cost/merge_memory.py \
      --out benchmarks/results/cost/merge_memory
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if 'jax' not in sys.modules:   # before jax starts: several host devices
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4')
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import optax_bema

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common


def peak_rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f
                if line.startswith('VmHWM')) / 1024


def live_bytes_per_device() -> dict:
  # From the sharding, not ``shard.data``: reading a shard makes an array.
  out: dict = {}
  for array in jax.live_arrays():
    nbytes = (int(np.prod(array.sharding.shard_shape(array.shape)))
              * array.dtype.itemsize)
    for device in array.sharding.device_set:
      out[device] = out.get(device, 0) + nbytes
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', help='directory for results.json')
  parser.add_argument('--rows', type=int, default=4096)
  parser.add_argument('--cols', type=int, default=4096)
  parser.add_argument('--checkpoints', type=int, default=8)
  args = parser.parse_args()
  mesh = jax.make_mesh((jax.device_count(),), ('model',))
  sharding = NamedSharding(mesh, P(None, 'model'))
  shape = (args.rows, args.cols)
  steps = list(range(100, 100 + 10 * args.checkpoints + 1, 10))

  def restore(step):   # what Orbax does: each device reads its own shard
    def shard(index):   # only the shard's values, never the whole matrix
      cols = index[1].indices(shape[1])
      rng = np.random.default_rng([step, cols[0]])
      return rng.standard_normal((shape[0], len(range(*cols))), np.float32)
    return {'w': jax.make_array_from_callback(shape, sharding, shard)}

  shard_bytes = args.rows * args.cols * 4 // jax.device_count()
  samples = []

  def saved():
    for step in [0] + steps:
      samples.append(live_bytes_per_device())
      params = restore(step)
      samples.append(live_bytes_per_device())
      yield step, params
      del params   # as Orbax's restore loop: the caller holds the snapshot

  restore(1)['w'].block_until_ready()   # the allocator's first checkpoint
  rss_before = peak_rss_mb()
  one = restore(1)
  one['w'].block_until_ready()
  rss_one = peak_rss_mb()
  del one
  started = time.time()
  merged = optax_bema.replay(
      optax_bema.decay_profile(steps, steps[-1], 'linear'), saved())
  merged['w'].block_until_ready()
  seconds = time.time() - started
  rss_merge = peak_rss_mb()
  per_device = [max(s.values(), default=0) / shard_bytes for s in samples]
  results = dict(
      devices=jax.device_count(), checkpoints=len(steps),
      checkpoint_mb=args.rows * args.cols * 4 / 2 ** 20,
      shard_mb_per_device=shard_bytes / 2 ** 20,
      live_per_device_in_checkpoints=dict(peak=max(per_device),
                                          samples=per_device),
      peak_rss_mb=dict(before=rss_before, after_one_checkpoint=rss_one,
                       after_merge=rss_merge),
      merge_seconds=round(seconds, 2), sharding=str(merged['w'].sharding),
      machine=_common.machine_line())
  print(f'{len(steps)} checkpoints of {results["checkpoint_mb"]:.0f} MB over '
        f'{jax.device_count()} devices ({results["shard_mb_per_device"]:.0f}'
        f' MB each), merged in {seconds:.1f}s: live arrays per device peak '
        f'at {max(per_device):.2f} checkpoint shards (before/after each '
        f'read: {", ".join(f"{v:.1f}" for v in per_device)}); peak RSS '
        f'{rss_before:.0f} MB before, {rss_one:.0f} MB with one checkpoint, '
        f'{rss_merge:.0f} MB after the merge')
  if args.out:
    print('wrote', _common.write_results(args.out, results))


if __name__ == '__main__':
  main()
