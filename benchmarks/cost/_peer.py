"""The peer: TRL's BEMACallback against a torch AdamW step, on the same leaves.

Needs the ``peers`` extra (torch, transformers, trl); ``overhead.py`` imports
this module only when asked for ``--peer``.
"""

from __future__ import annotations

import math
import os
import types

import torch
import transformers
from trl.trainer.callbacks import BEMACallback

import _timing


class _Config(transformers.PretrainedConfig):
  model_type = 'overhead_benchmark'

  def __init__(self, shapes=(), **kwargs):
    super().__init__(**kwargs)
    self.shapes = [list(s) for s in shapes]


class _Model(transformers.PreTrainedModel):
  """The same leaves as the JAX run; TRL copies the model by its config."""
  config_class = _Config

  def __init__(self, config):
    super().__init__(config)
    self.weights = torch.nn.ParameterList(
        [torch.nn.Parameter(0.02 * torch.randn(s)) for s in config.shapes])


def bench_peer(size, shapes, learning_rate, rounds, round_s, log) -> dict:
  """TRL's BEMA update (every step) against torch.optim.AdamW's step.

  Args:
    size: the size's name, for the row.
    shapes: the leaves' shapes, as the JAX run has them.
    learning_rate: AdamW's.
    rounds: paired rounds, as in ``_timing.compare``.
    round_s: seconds each side runs per round.
    log: prints and keeps a line of the table.

  Returns:
    The row, with the JAX rows' fields where they mean the same.
  """
  torch.set_num_threads(os.cpu_count())
  model = _Model(_Config(shapes))
  for p in model.parameters():
    p.grad = 1e-3 * torch.randn_like(p)
  n = sum(p.numel() for p in model.parameters())
  # fused: what Hugging Face Trainer runs by default (adamw_torch_fused).
  opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)
  callback = BEMACallback(update_freq=1)
  state = types.SimpleNamespace(global_step=0)  # all the callback reads
  control = None
  targs = None
  callback.on_train_begin(targs, state, control, model=model)

  def adamw_step():
    with torch.no_grad():
      opt.step()

  def bema_step():
    with torch.no_grad():
      opt.step()
      state.global_step += 1
      callback.on_step_end(targs, state, control, model=model)

  for fn in (adamw_step, bema_step):
    _timing.timed(fn, 2)
  steps = max(2, math.ceil(round_s / _timing.timed(adamw_step, 2)[0]))
  row = dict(size=size, params=n, dtype='float32', name='trl.bema',
             update_freq=1,
             **_timing.compare(lambda: _timing.timed(adamw_step, steps),
                               lambda: _timing.timed(bema_step, steps),
                               rounds),
             torch=torch.__version__, threads=torch.get_num_threads())
  log(f"{size:>5} {'float32':>8} {'trl.bema':>9} {1:>4} {row['ratio']:6.3f} "
      f"[{row['ratio_q1']:5.3f},{row['ratio_q3']:5.3f}] {row['ms_step']:8.3f} "
      f"{row['adamw_ms_step']:8.3f}   (torch {torch.__version__}, "
      f'{torch.get_num_threads()} threads)')
  return row
