"""tspd: Stochastic Parameter Decomposition for transformer models.

    >>> import tspd
    >>> dec = tspd.decompose(target, data, tspd.RunConfig.from_yaml("configs/tms-5-2.yaml"))  # doctest: +SKIP
"""

from tspd.config import ConfigError, RunConfig
from tspd.decomposition import Decomposition, load
from tspd.train import TrainingDiverged, decompose

__all__ = ["RunConfig", "ConfigError", "Decomposition", "decompose", "load", "TrainingDiverged"]
__version__ = "0.1.0"
