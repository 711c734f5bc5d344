"""optax_bema: weight averages that make the returned model better.

Stabilizers that average the training trajectory without changing it (EMA,
BEMA, DEMA, OUEMA), as Optax transforms that go last in a chain; PACE, AdamW
pulled toward its own EMA; the adaptive AdEMAMix; and the model they return
through :func:`averaged_params`.
"""

from optax_bema._adaptive_ademamix import AdaptiveAdemamixState
from optax_bema._adaptive_ademamix import adaptive_ademamix
from optax_bema._pace import PaceState
from optax_bema._pace import PaceTelemetry
from optax_bema._pace import pace
from optax_bema._pace import pace_telemetry
from optax_bema._readout import averaged_params
from optax_bema._stabilizers import BemaState
from optax_bema._stabilizers import DemaState
from optax_bema._stabilizers import EmaState
from optax_bema._stabilizers import OuemaState
from optax_bema._stabilizers import bema
from optax_bema._stabilizers import dema
from optax_bema._stabilizers import ema
from optax_bema._stabilizers import ouema

__version__ = '0.1.0'

__all__ = [
    'AdaptiveAdemamixState',
    'BemaState',
    'DemaState',
    'EmaState',
    'OuemaState',
    'PaceState',
    'PaceTelemetry',
    'adaptive_ademamix',
    'averaged_params',
    'bema',
    'dema',
    'ema',
    'ouema',
    'pace',
    'pace_telemetry',
]
