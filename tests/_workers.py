"""Runs worker scripts as separate processes, for the multi-process tests.

Each worker joins ``jax.distributed`` on loopback (or runs alone); the test
waits for all of them, within one deadline, and fails with the tail of the
log of any that failed.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run(worker: pathlib.Path, argvs: list[list], timeout_s: float):
  """Runs ``worker`` once per argument list, all at once, on CPU."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(worker.parents[1]))
  procs = [subprocess.Popen(
      [sys.executable, str(worker), *map(str, argv)], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for argv in argvs]
  deadline = time.monotonic() + timeout_s
  try:
    logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            for p in procs]
    for p, log in zip(procs, logs):
      assert p.returncode == 0, log[-4000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def two_processes_and_one(worker: pathlib.Path, tmp: pathlib.Path,
                          timeout_s: float, *, own_dirs: bool = False):
  """Runs ``worker`` as the two processes of one ``jax.distributed`` run
  and alone; returns the arrays each saved (process 0, process 1, alone).

  A worker's arguments are its output file, with ``own_dirs`` a folder
  that the processes of one run share, then its process index, the
  number of processes and the coordinator's port.
  """
  port = free_port()
  outs = [tmp / f'{name}.npz' for name in ('process0', 'process1', 'one')]
  folder = lambda name: [tmp / name] if own_dirs else []
  run(worker, [[outs[0], *folder('two'), 0, 2, port],
               [outs[1], *folder('two'), 1, 2, port],
               [outs[2], *folder('one'), 0, 1, 0]], timeout_s)
  return [dict(np.load(out)) for out in outs]
