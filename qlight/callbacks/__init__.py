"""Training methods and schedules as Lightning callbacks (they only schedule and blend), diagnostics and timing."""

from qlight.callbacks.aqe import AQE  # noqa: F401
from qlight.callbacks.bcgd import BCGD  # noqa: F401
from qlight.callbacks.binary_relax import BinaryRelax  # noqa: F401
from qlight.callbacks.clip import LatentWeightClip  # noqa: F401
from qlight.callbacks.diagnostics import QuantDiagnostics  # noqa: F401
from qlight.callbacks.ede import EDE  # noqa: F401
from qlight.callbacks.throughput import Throughput  # noqa: F401

__all__: list[str] = []
