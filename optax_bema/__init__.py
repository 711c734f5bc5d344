"""optax_bema: weight averages that make the returned model better.

Stabilizers that average the training trajectory without changing it (EMA,
BEMA, DEMA, OUEMA, EDM2's power-function EMA), as Optax transforms that go
last in a chain; PACE, AdamW pulled toward its own EMA; the adaptive
AdEMAMix; the model they return through :func:`averaged_params`; and the
tools to choose the average after training (:func:`averages`,
:func:`profile`, :func:`replay`, :func:`posthoc_ema`,
:func:`snapshot_steps`, :func:`synthesize`), to choose it in one call
(:func:`choose`, with Orbax: :func:`snapshot_options`,
:func:`orbax_snapshots`), and the merge of saved checkpoints that acts as
a learning-rate decay (:func:`decay_profile`).
"""

from optax_bema._adaptive_ademamix import AdaptiveAdemamixState
from optax_bema._adaptive_ademamix import adaptive_ademamix
from optax_bema._averages import AveragesState
from optax_bema._averages import averages
from optax_bema._candidates import default_candidates
from optax_bema._choice import Choice
from optax_bema._choose import choose
from optax_bema._fit import SynthesizedProfile
from optax_bema._fit import synthesized_profile
from optax_bema._kinds import BemaState
from optax_bema._kinds import DemaState
from optax_bema._kinds import EmaState
from optax_bema._kinds import OuemaState
from optax_bema._orbax import OrbaxSnapshots
from optax_bema._orbax import orbax_snapshots
from optax_bema._orbax import snapshot_options
from optax_bema._pace import PaceState
from optax_bema._pace import PaceTelemetry
from optax_bema._pace import pace
from optax_bema._pace import pace_telemetry
from optax_bema._posthoc import posthoc_ema
from optax_bema._posthoc import snapshot_steps
from optax_bema._readout import NeverUpdatedWarning
from optax_bema._readout import averaged_params
from optax_bema._replay import replay
from optax_bema._stabilizers import bema
from optax_bema._stabilizers import dema
from optax_bema._stabilizers import ema
from optax_bema._stabilizers import ouema
from optax_bema._stabilizers import power_ema
from optax_bema._synthesis import Synthesized
from optax_bema._synthesis import synthesize
from optax_bema._targets import decay_profile
from optax_bema._targets import profile
from optax_bema._targets import uniform_profile

__version__ = '0.1.0'

__all__ = [
    'AdaptiveAdemamixState',
    'AveragesState',
    'BemaState',
    'Choice',
    'DemaState',
    'EmaState',
    'OrbaxSnapshots',
    'OuemaState',
    'PaceState',
    'PaceTelemetry',
    'Synthesized',
    'SynthesizedProfile',
    'adaptive_ademamix',
    'NeverUpdatedWarning',
    'averaged_params',
    'averages',
    'bema',
    'choose',
    'decay_profile',
    'default_candidates',
    'dema',
    'ema',
    'orbax_snapshots',
    'ouema',
    'pace',
    'pace_telemetry',
    'posthoc_ema',
    'power_ema',
    'profile',
    'replay',
    'snapshot_options',
    'snapshot_steps',
    'synthesize',
    'synthesized_profile',
    'uniform_profile',
]
