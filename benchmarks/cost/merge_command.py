"""Peak memory of ``optax-bema merge`` over k checkpoints, against one.

Writes 16 + 1 Orbax checkpoints of float32 params (four equal leaves; the
layout docs/scaling_out.md saves, params only), then runs the command in a
subprocess for k = 1, 2, 4, 8, 16 checkpoints (``--window k*N --every N``)
and records each run's peak resident memory (the child's ``ru_maxrss``).
The baseline is the same command reading no arrays (``inspect`` of the
same directory: the imports, JAX's runtime and Orbax's metadata). Merging
one checkpoint at a time, the peak above the baseline should not grow with
k: replay keeps the running sum and the snapshot it reads, and the next one
is restored while the last is still referenced.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np
import orbax.checkpoint as ocp

import _common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
EVERY = 10
COUNTS = (1, 2, 4, 8, 16)
# Measures the command it is given and prints its peak resident memory.
_PEAK = ('import resource, subprocess, sys; '
         'subprocess.run(sys.argv[1:], check=True, '
         'stdout=subprocess.DEVNULL); '
         'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)')


def write(directory: str, mib: int):
  size = mib * 2 ** 20 // 16   # four float32 leaves
  rng = np.random.default_rng(0)
  base = {f'w{i}': rng.standard_normal(size, np.float32) for i in range(4)}
  with ocp.CheckpointManager(directory) as manager:
    for k in range(max(COUNTS) + 1):
      step = k * EVERY
      manager.save(step, args=ocp.args.StandardSave(
          {'params': {n: x + np.float32(step) for n, x in base.items()}}))


def peak_mib(*args) -> tuple[float, float]:
  """The command's peak resident memory in MiB, and its wall time."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = time.perf_counter()
  done = subprocess.run(
      [sys.executable, '-c', _PEAK, sys.executable, '-m', 'optax_bema',
       *map(str, args)], capture_output=True, text=True, env=env, check=True)
  return int(done.stdout.split()[-1]) / 1024, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _common.add_common_args(parser, os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      'results', 'cost', 'merge_command'))
  args = parser.parse_args()
  mib = 16 if args.quick else 256
  with tempfile.TemporaryDirectory() as scratch:
    ckpt = os.path.join(scratch, 'ckpt')
    write(ckpt, mib)
    baseline, _ = peak_mib('inspect', ckpt)
    rows = []
    for k in COUNTS:
      peak, seconds = peak_mib('merge', ckpt, os.path.join(scratch, f'm{k}'),
                               '--window', k * EVERY, '--every', EVERY)
      rows.append(dict(checkpoints=k, peak_mib=round(peak, 1),
                       above_baseline_mib=round(peak - baseline, 1),
                       in_checkpoints=round((peak - baseline) / mib, 2),
                       seconds=round(seconds, 2)))
  print(f'one checkpoint: {mib} MiB of float32 params; baseline (inspect, no '
        f'arrays read): {baseline:.0f} MiB peak')
  print(f'{"k":>3}  {"peak MiB":>9}  {"above baseline":>15}  '
        f'{"in checkpoints":>15}  {"seconds":>8}')
  for r in rows:
    print(f'{r["checkpoints"]:>3}  {r["peak_mib"]:>9.0f}  '
          f'{r["above_baseline_mib"]:>15.0f}  {r["in_checkpoints"]:>15.2f}  '
          f'{r["seconds"]:>8.1f}')
  _common.write_results(args.out, dict(
      checkpoint_mib=mib, baseline_mib=round(baseline, 1), rows=rows,
      machine=_common.machine()))


if __name__ == '__main__':
  main()
