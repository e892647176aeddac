"""tspd: Stochastic Parameter Decomposition for transformer models.

    >>> import tspd
    >>> dec = tspd.decompose(target, data, tspd.RunConfig.from_yaml("configs/tms-5-2.yaml"))  # doctest: +SKIP
"""

from tspd.config import ConfigError, RunConfig
from tspd.decomposition import Decomposition, load
from tspd.train import TrainingDiverged, decompose

__all__ = ["RunConfig", "ConfigError", "Decomposition", "decompose", "load", "TrainingDiverged"]
__version__ = "0.1.0"

# Subpackages the README reaches as attributes (`tspd.app.serve(...)`, `tspd.analysis...`), imported
# on first use so that `import tspd` stays light.
_LAZY = {"app", "analysis", "report", "experiments", "targets", "data"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"tspd.{name}")
    raise AttributeError(f"module 'tspd' has no attribute {name!r}")
