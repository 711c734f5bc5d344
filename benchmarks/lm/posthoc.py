"""Choosing the average after training, on the language-model fine-tuning.

Each seed fine-tunes ONCE with ``optax_bema.posthoc_ema()`` last in the chain
and saves ``(its state, params)`` to host memory at the steps
``optax_bema.snapshot_steps(steps, 40)`` names, as a user saves checkpoints.
After training, ``optax_bema.choose`` picks the model: its default
candidates and every setting of a grid (the four stabilizers x
``ema_power`` x ``bias_power`` x ``update_freq``), synthesized from those
snapshots, scored on a VALIDATION split, the best kept among those the
snapshots support; the grid is also synthesized in one
``optax_bema.synthesize`` pass, to measure the synthesis. The validation
windows
are the training text's last bytes, which no training batch samples; the
held-out windows are the corpus' tail, as in the main comparison, and only
the report reads them. The same is done again from fewer snapshots
(``snapshot_steps(steps, 20)`` and ``(steps, 10)``, saved in the same run),
to see what the count costs.

A setting whose model weighs only saved steps (its profile is zero at every
other step) is not synthesized but read off the saved params: ``synthesize``
fits it exactly. The schedule does not avoid that (the old fixed spacing,
coprime with every ``update_freq``, did): at 300 steps (quick) the evenly
spaced part of ``snapshot_steps(300, 40)`` is every 10th step, so every
``update_freq`` 10 and 30 setting (36 of 72, the online defaults among
them) is exact; from 20 or 10 snapshots, and at 1000 steps (full) from any
of the three counts, none is. The results list these settings
(``grid['schedules']``); the synthesis' accuracy (model errors,
validation-loss gaps) is reported over the other settings only, and the
choice is made over all of them, as a user's.

The choice is compared with the models the grid's settings (and choose's
default targets) really return on that trajectory. Tracking 100+
stabilizers online costs minutes of compilation and ~20x the step time
here, so each is computed exactly instead: the model after T steps is
``sum_s w[s] theta_s`` with ``w`` its profile (``optax_bema.profile``),
applied to every iterate of the run on the host.
The four defaults are also run online (``optax_bema.averages``) in the same
chain; their models are the defaults reported, and their distance to the
profile sums checks that identity.

The setup (the pretrained model, the corpus, the AdamW run at the base rate)
is the comparison's (``_runs.py``); ``finetune.py --posthoc`` runs this
study, and run directly, this script does the same, with all of
``finetune.py``'s options:

  python benchmarks/lm/posthoc.py --quick --out DIR
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import time
from typing import Mapping

import jax
import jax.flatten_util
import numpy as np
import optax
import tqdm

import optax_bema

# The helpers every group shares (_common) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import _common
import _lm
import _posthoc_report
import _runs
import _schedules
from optax_bema import catalog

# Per mode: the grid; the snapshot count the choice is made from
# (snapshot_steps' num_snapshots), and the fewer it is also made from.
GRIDS = {
    'full': dict(ema_powers=(0.3, 0.5, 0.7, 0.9),
                 bias_powers=(0.1, 0.2, 0.3, 0.5),
                 update_freqs=(1, 3, 10, 30), snapshots=40, fewer=(20, 10)),
    'quick': dict(ema_powers=(0.3, 0.5, 0.8), bias_powers=(0.2, 0.4),
                  update_freqs=(1, 3, 10, 30), snapshots=40, fewer=(20, 10)),
    'smoke': dict(ema_powers=(0.5, 0.9), bias_powers=(0.2,),
                  update_freqs=(1, 10), snapshots=4, fewer=(2,)),
}
_TAKES_BIAS_POWER = ('bema', 'ouema')
_EVAL_CHUNK = 8  # models scored per compiled call



def name_of(kind, ema_power, bias_power, update_freq) -> str:
  bias = f'/b={bias_power:g}' if kind in _TAKES_BIAS_POWER else ''
  return f'{kind}/e={ema_power:g}{bias}/f={update_freq}'


def grid(ema_powers, bias_powers, update_freqs, *, base: Mapping,
         **unused) -> dict[str, dict]:
  """``{name: settings}`` over the four stabilizers; ``base`` fills the other
  settings (``lag``, ``multiplier``, ``update_after``)."""
  del unused
  base = {k: v for k, v in base.items() if k != 'bias_power'}
  out = {}
  for kind in catalog.BEMA_PAPER:
    takes_bias = kind in _TAKES_BIAS_POWER
    for e, b, f in itertools.product(
        ema_powers, bias_powers if takes_bias else (None,), update_freqs):
      out[name_of(kind, e, b, f)] = dict(
          base, kind=kind, ema_power=e, update_freq=f,
          **({'bias_power': b} if takes_bias else {}))
  return out


def stabilizer(settings: Mapping) -> optax.GradientTransformation:
  settings = dict(settings)
  return catalog.stabilizer(settings.pop('kind'), **settings)


class ProfileSums:
  """Each setting's exact model: its profile applied to a run's iterates.

  ``add`` the flattened iterates theta_0, theta_1, ... in order; each block
  of them is folded into the sums by one matrix product, so the trajectory
  itself is never kept.
  """

  def __init__(self, profiles: np.ndarray, size: int, block: int = 64):
    self.profiles = profiles.astype(np.float32)  # (settings, steps + 1)
    self.sums = np.zeros((len(profiles), size), np.float32)
    self.block, self.buffer, self.next = block, [], 0

  def add(self, theta: np.ndarray):
    self.buffer.append(theta)
    if len(self.buffer) == self.block:
      self._fold()

  def _fold(self):
    stop = self.next + len(self.buffer)
    self.sums += self.profiles[:, self.next:stop] @ np.stack(self.buffer)
    self.buffer, self.next = [], stop

  def models(self) -> np.ndarray:
    if self.buffer:
      self._fold()
    if self.next != self.profiles.shape[1]:
      raise ValueError(f'{self.next} iterates added; the profiles span '
                       f'{self.profiles.shape[1]}.')
    return self.sums


class OnDevice:
  """Host snapshots, each put on the device as ``synthesize`` reads it: the
  lazily loading re-iterable it asks for (Orbax steps would load alike)."""

  def __init__(self, snapshots):
    self.snapshots = snapshots

  def __iter__(self):
    return map(jax.device_put, self.snapshots)


def scorer(model: _lm.Transformer, unravel):
  """``score(flat_models, windows)``: the loss of each row's model."""
  @jax.jit
  def losses(flat, windows):
    return jax.lax.map(lambda v: _lm.loss_fn(model, unravel(v), windows), flat)

  def score(flat, windows):
    out = []
    for i in range(0, len(flat), _EVAL_CHUNK):
      part = flat[i:i + _EVAL_CHUNK]
      padded = np.concatenate(  # one shape, one compilation
          [part, np.repeat(part[-1:], _EVAL_CHUNK - len(part), 0)])
      out.append(np.asarray(losses(padded, windows))[:len(part)])
    return np.concatenate(out)
  return score


def _flat(tree) -> np.ndarray:
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def read_only_saved(profiles: np.ndarray, saved) -> np.ndarray:
  """Which rows of ``profiles`` weigh only the steps ``saved``: those
  settings' models are combinations of the saved params, which
  ``synthesize`` fits exactly."""
  unsaved = np.ones(profiles.shape[1], bool)
  unsaved[list(saved)] = False
  return ~np.any(profiles[:, unsaved], axis=1)


def train_seed(model, params, optimizer, batches, profiles: np.ndarray,
               online: Mapping, saved, bar):
  """One fine-tuning run from ``params``, ``posthoc_ema`` last.

  ``profiles`` holds each setting's weights on the iterates, a row each.
  Returns ``(snapshots, exact, online_models, last)``: the
  ``(posthoc_ema state, params)`` pairs saved at the steps ``saved``, by
  step (host NumPy); each setting's exact model, a flattened row per
  setting; the flattened model of each of ``online`` (stabilizers by name,
  run in the same chain); the flattened last iterate.
  """
  steps = len(batches)
  sums = ProfileSums(profiles, _flat(params).size)
  # Both pass the updates through, so each sees theta_t as if it were last.
  tx = optax.chain(optimizer, optax_bema.posthoc_ema(),
                   optax_bema.averages(**online))

  @jax.jit
  def step(params, state, windows):
    grads = jax.grad(lambda p: _lm.loss_fn(model, p, windows))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state, jax.flatten_util.ravel_pytree(params)[0]

  state, snapshots = tx.init(params), {}
  sums.add(_flat(params))
  for t in range(steps + 1):
    if t:
      params, state, flat = step(params, state, batches[t - 1])
      sums.add(np.asarray(flat))
      bar.update()
    if t in saved:
      # posthoc_ema's state alone, as its user saves it: the online
      # averages beside it would be a second averages state.
      snapshots[t] = jax.device_get((state[1], params))
  online_models = np.stack([_flat(optax_bema.averaged_params(
      state[2], params, name=k)) for k in online])
  return snapshots, sums.models(), online_models, _flat(params)


def study_seed(model, params, optimizer, batches, validation, held_out, *,
               settings: Mapping, defaults: Mapping[str, str],
               profiles: np.ndarray, schedules: list[Mapping],
               candidates: Mapping, bar) -> dict:
  """Train once, choose on ``validation``, report on ``held_out``.

  ``defaults`` maps a label to a setting's name; those run online too.
  ``profiles`` are the settings' weights on the iterates, in order.
  ``schedules`` (``num_snapshots``, the ``steps`` saved, which settings
  are ``exact`` from them) are each synthesized from (the grid, for the
  synthesis' accuracy) and chosen from with ``optax_bema.choose`` (its
  default candidates and the grid); the first is the post-hoc choice
  reported. ``profiles`` holds the grid's rows, then those of
  ``candidates``, choose's default targets, so that a choice among them
  has its exact model too.
  """
  names = list(settings)
  score = scorer(model, jax.flatten_util.ravel_pytree(params)[1])
  clock = [time.perf_counter()]

  def lap():
    clock.append(time.perf_counter())
    return round(clock[-1] - clock[-2], 1)
  snapshots, exact_all, online, last = train_seed(
      model, params, optimizer, batches, profiles,
      {k: stabilizer(settings[v]) for k, v in defaults.items()},
      set().union(*(s['steps'] for s in schedules)), bar)
  seconds = dict(train=lap())
  exact = exact_all[:len(names)]
  exact_of = dict(zip([*names, *candidates], exact_all))
  targets = {k: stabilizer(settings[k]) for k in names}
  validation_loss = jax.jit(lambda p: _lm.loss_fn(model, p, validation))

  def model_error(approx, truth):
    """||approx - truth|| / ||truth - last iterate||: the part of what
    averaging changes that ``approx`` gets wrong."""
    return float(np.linalg.norm(approx - truth)
                 / np.linalg.norm(truth - last))

  # Each schedule's models are reduced to what is reported as soon as they
  # are scored: three sets of them would crowd a small machine's memory.
  runs = []
  for i, schedule in enumerate(schedules):
    out = optax_bema.synthesize(
        targets, OnDevice([snapshots[t] for t in schedule['steps']]))
    models = np.stack([_flat(out.model[k]) for k in names])
    if i == 0:
      synth, residual = models, out.residual
    del out
    val = score(models, validation)
    errors = np.array([model_error(*pair) for pair in zip(models, exact)])
    del models
    seconds['synthesize' if i == 0 else 'fewer'] = lap()
    runs.append(dict(errors=errors, val=val, **choose(
        OnDevice([snapshots[t] for t in schedule['steps']]), targets,
        validation_loss)))
    seconds['choose' if i == 0 else 'choose_fewer'] = lap()
  kinds = {k: [i for i, n in enumerate(names) if settings[n]['kind'] == k]
           for k in catalog.BEMA_PAPER}
  val_exact, held_exact = score(exact, validation), score(exact, held_out)
  val_synth = [run['val'] for run in runs]
  by_validation, hindsight = int(np.argmin(val_exact)), int(np.argmin(
      held_exact))
  # Each stabilizer's own post-hoc choice, as for a user who wants BEMA.
  kind_choice = {k: min(rows, key=val_synth[0].__getitem__)
                 for k, rows in kinds.items()}
  held_last, *held_more = score(np.stack(
      [last, *online, *synth[list(kind_choice.values())],
       *(run['model'] for run in runs)]), held_out)
  held_online = held_more[:len(online)]
  held_kind = held_more[len(online):len(online) + len(kinds)]
  held_chosen = held_more[len(online) + len(kinds):]
  seconds['score'] = lap()

  def entry(i, held, validation_loss=None):
    return dict(name=names[i], held_out_loss=float(held),
                validation_loss=float(val_exact[i] if validation_loss is None
                                      else validation_loss),
                held_out_rank=int(np.sum(held_exact < held)) + 1)

  def chosen(run, held):
    """The choice ``choose`` made, and its exact model's entry where it is
    one of the settings or of choose's default targets."""
    out = dict(name=run['name'], held_out_loss=float(held),
               validation_loss=run['score'],
               held_out_rank=int(np.sum(held_exact < held)) + 1,
               residual=run['residual'], estimated_error=run['error'])
    if run['name'] in exact_of:
      truth = exact_of[run['name']]
      out['model_error'] = model_error(run['model'], truth)
      (held_truth,) = score(truth[None], held_out)
      out['exact'] = dict(name=run['name'], held_out_loss=float(held_truth),
                          held_out_rank=int(np.sum(held_exact < held_truth))
                          + 1)
    return out

  def accuracy(schedule, run, held):
    """The synthesis' accuracy from one schedule, over the settings it
    really synthesizes, and the choice made from it."""
    errors, val = run['errors'], run['val']
    exact_rows = np.array([n in schedule['exact'] for n in names])
    gaps = np.where(exact_rows, np.nan, np.abs(val - val_exact))
    return dict(
        num_snapshots=schedule['num_snapshots'],
        model_error={k: dict(median=float(np.median(e)), max=float(e.max()))
                     for k, rows in kinds.items()
                     for e in [errors[rows][~exact_rows[rows]]] if e.size},
        exact_settings_max_model_error=(
            float(errors[exact_rows].max()) if exact_rows.any() else None),
        max_validation_gap=float(np.nanmax(gaps)),
        max_validation_gap_at=names[int(np.nanargmax(gaps))],
        median_validation_gap=float(np.nanmedian(gaps)),
        rank_correlation=_rank_correlation(val, val_exact),
        choice=chosen(run, held), cost=run['cost'],
        gap_to_hindsight=float(held - held_exact[hindsight]))

  return dict(
      last_iterate=dict(held_out_loss=float(held_last)),
      defaults={
          label: dict(entry(names.index(name), held),
                      profile_check=model_error(
                          exact[names.index(name)], online_model))
          for (label, name), online_model, held in zip(
              defaults.items(), online, held_online)},
      posthoc=chosen(runs[0], held_chosen[0]),
      by_stabilizer={k: dict(
          posthoc=entry(kind_choice[k], held, val_synth[0][kind_choice[k]]),
          hindsight=entry(best, held_exact[best]))
                     for (k, rows), held in zip(kinds.items(), held_kind)
                     for best in [min(rows, key=held_exact.__getitem__)]},
      exact_choice=entry(by_validation, held_exact[by_validation]),
      hindsight=entry(hindsight, held_exact[hindsight]),
      synthesis=dict(
          max_residual=float(max(residual.values())),
          by_schedule=[accuracy(*args) for args in zip(
              schedules, runs, held_chosen)]),
      # How well validation predicts held-out among the exact models: what
      # any choice on this validation split can achieve.
      validation_vs_held_out=_rank_correlation(val_exact, held_exact),
      losses={k: dict(validation_synthesized=float(v), validation=float(e),
                      held_out=float(h))
              for k, v, e, h in zip(names, val_synth[0], val_exact,
                                    held_exact)},
      snapshots=len(schedules[0]['steps']), seconds=seconds)


def choose(snapshots, targets: Mapping, validation_loss) -> dict:
  """``optax_bema.choose`` over its default candidates and ``targets``,
  by ``validation_loss``; the choice, and what it cost: seconds, and the
  peak bytes of the live device arrays while scoring, beyond those alive
  before (the snapshots are on the host)."""
  before = _live_bytes()
  peak = [before]

  def score(p):
    peak[0] = max(peak[0], _live_bytes())
    return float(validation_loss(p))  # concrete: choose calls it as it is
  started = time.perf_counter()
  choice = optax_bema.choose(snapshots, score, candidates=targets,
                             progress=False)
  seconds = time.perf_counter() - started
  row = next(r for r in choice.table if r.name == choice.name)
  model = _flat(choice.model)
  return dict(name=choice.name, score=choice.score, model=model,
              residual=row.residual, error=row.error, cost=dict(
                  seconds=round(seconds, 1), candidates=len(choice.table),
                  refused=sum(bool(set(r.flags) & {'unsupported',
                                                   'never updated'})
                              for r in choice.table),
                  peak_bytes=peak[0] - before,
                  peak_models=round((peak[0] - before) / model.nbytes, 1)))


def _live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def _rank_correlation(a, b) -> float:
  """Spearman's rho (float losses have no ties)."""
  return float(np.corrcoef(*(np.argsort(np.argsort(v)) for v in (a, b)))[0, 1])


def study(mode: str, config: Mapping, model, params, optimizer, train_bytes,
          held_out, *, base: Mapping, update_freq: int, desc: str) -> dict:
  """Every seed of ``config`` (``_runs.CONFIGS[mode]``), the grid of
  ``GRIDS[mode]``; the defaults are ``base`` at ``update_freq``."""
  plan = GRIDS[mode]
  settings = grid(**plan, base=base)
  defaults = {k: name_of(k, base['ema_power'], base['bias_power'],
                         update_freq) for k in catalog.BEMA_PAPER}
  if not set(defaults.values()) <= set(settings):
    raise ValueError(f'the {mode} grid lacks the defaults {defaults}.')
  profiles = np.stack([optax_bema.profile(stabilizer(s), config['steps'])
                       for s in settings.values()])
  # choose's own default targets, so a choice among them has an exact model.
  candidates = {k: target for k, (target, _, _) in
                optax_bema.default_candidates(config['steps']).items()
                if k not in settings}
  every = np.concatenate([profiles, np.stack([
      target if isinstance(target, np.ndarray)
      else optax_bema.profile(target, config['steps'])
      for target in candidates.values()])])
  schedules = []
  for count in (plan['snapshots'], *plan['fewer']):
    steps = optax_bema.snapshot_steps(config['steps'], count)
    schedules.append(dict(num_snapshots=count, steps=steps, exact=[
        k for k, only in zip(settings, read_only_saved(profiles, steps))
        if only]))
  context = config['model'].context
  train, validation = _runs.validation_split(
      train_bytes, config['eval_windows'], context)
  held = _lm.eval_windows(held_out, config['eval_windows'], context)
  per_seed = []
  with tqdm.tqdm(total=config['seeds'] * config['steps'], desc=desc) as bar:
    first = config['first_seed']
    for seed in range(first, first + config['seeds']):
      # The main comparison's batch stream, from a text without the
      # validation windows.
      rng = np.random.default_rng(1000 + seed)
      batches = [_lm.sample_batch(rng, train, config['batch'], context)
                 for _ in range(config['steps'])]
      per_seed.append(study_seed(
          model, params, optimizer, batches, validation, held,
          settings=settings, defaults=defaults, profiles=every,
          schedules=schedules, candidates=candidates, bar=bar))
  return dict(summary=_posthoc_report.summarize(per_seed), per_seed=per_seed,
              grid=dict(plan, size=len(settings), schedules=schedules),
              defaults=defaults, validation_windows=len(validation),
              held_out_windows=len(held))


def main(out_dir: str, mode: str, config: Mapping, model, params, optimizer,
         corpus: bytes, corpus_name: str, *, base: Mapping, update_freq: int,
         training: Mapping) -> str:
  """Runs :func:`study`, writes ``out_dir/posthoc.json``, prints the table.

  ``training`` describes ``optimizer`` for the record.
  """
  started = time.time()
  train_bytes, held_out = _lm.split(corpus)
  results = study(mode, config, model, params, optimizer, train_bytes,
                  held_out, base=base, update_freq=update_freq,
                  desc=f'post-hoc study on {corpus_name}')
  wall = time.time() - started
  results['config'] = dict(
      mode=mode, finetune_corpus=corpus_name, steps=config['steps'],
      batch=config['batch'], seeds=config['seeds'],
      first_seed=config['first_seed'], training=dict(training),
      stabilizer=dict(base, update_freq=update_freq),
      machine=_common.machine_line(), wall_seconds=round(wall, 1))
  # Beside the comparison's results.json, which it neither reads nor clobbers.
  path = _common.write_results(out_dir, results, 'posthoc.json')
  print(_posthoc_report.report(results, (
      f'\nchoosing the average after training on {corpus_name} ({mode}: '
      f'{config["steps"]} steps, {config["seeds"]} seed(s), '
      f'{results["grid"]["size"]} settings, snapshots at the '
      f'{len(results["grid"]["schedules"][0]["steps"])} steps of '
      f'snapshot_steps({config["steps"]}, '
      f'{results["grid"]["snapshots"]}))')))
  _posthoc_report.plot(results, out_dir, f'{corpus_name}, {mode}')
  print(f'wrote {path} in {wall:.0f}s, pretraining aside '
        f'({_common.machine_line()})')
  return path


def run(out_dir: str, setup: _runs.Setup) -> str:
  """:func:`main` on the comparison's AdamW run at its base rate, trained
  once per seed (what ``finetune.py --posthoc`` runs)."""
  config = setup.config
  adamw = next(r.tx for r in _runs.runs(config, config['base_lr'], base=False)
               if r.name == 'adamw')
  return main(
      out_dir, setup.mode, config, setup.model, setup.params, adamw,
      setup.corpus, setup.corpus_name, base=_runs.STABILIZER,
      update_freq=_runs.UPDATE_FREQ, training=dict(
          learning_rate=config['base_lr'], schedule='constant',
          warmup_steps=_schedules.warmup_steps(config['steps']),
          weight_decay=_runs.WEIGHT_DECAY, clip_norm=_runs.CLIP_NORM))


if __name__ == '__main__':
  arguments, prepared = _runs.setup(
      ['--posthoc', '--out', 'benchmarks/results/lm/posthoc', *sys.argv[1:]],
      __doc__.splitlines()[0])
  run(arguments.out, prepared)
