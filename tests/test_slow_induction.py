"""The paper's induction result end to end (issue 4 acceptance): `make test-slow` (~15 min)."""

import pytest

from tspd.cli import CONFIGS_DIR
from tspd.experiments import run_experiment


@pytest.mark.slow
def test_induction_recipe_recovers_the_two_step_circuit(tmp_path):
    result = run_experiment(CONFIGS_DIR / "induction.yaml", tmp_path / "induction")
    ind = result["induction"]
    failed = [k for k, ok in ind["circuit_checks"].items() if not ok]
    assert not failed, (failed, ind)
    assert ind["svd_pieces_needed"] is None or ind["spd_active_per_input"] < ind["svd_pieces_needed"], ind
