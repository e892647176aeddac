"""End-to-end known-answer checks (SPEC §7): `make test-slow` (minutes each)."""

import pytest

from tspd.cli import CONFIGS_DIR
from tspd.experiments import run_experiment


@pytest.mark.slow
@pytest.mark.parametrize("recipe,n_features,tolerance", [("tms-5-2", 5, 0), ("tms-40-10", 40, 2)])
def test_tms_recovers_one_subcomponent_per_feature(tmp_path, recipe, n_features, tolerance):
    result = run_experiment(CONFIGS_DIR / f"{recipe}.yaml", tmp_path / recipe)
    tms = result["tms"]
    assert tms["mmcs"] >= 0.99, tms
    assert 0.95 <= tms["ml2r"] <= 1.05, tms
    assert abs(tms["alive"] - n_features) <= tolerance, tms
