"""RunConfig: validation, YAML round trip, dotted overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tspd
from tspd.config import ConfigError, RunConfig, apply_overrides

MINIMAL = {"sites": [{"pattern": "linear1", "C": 8}]}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_minimal_config_defaults():
    cfg = RunConfig.model_validate(MINIMAL)
    assert cfg.sites[0].pattern == "linear1" and cfg.sites[0].C == 8
    assert cfg.ci.kind == "mlp" and cfg.ci.leak == 0.01
    assert cfg.masks.kind == "continuous" and cfg.masks.delta_component is False
    assert cfg.output.divergence == "kl" and cfg.output.positions is None
    assert cfg.target is None and cfg.data is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({**MINIMAL, "sedd": 1}, "sedd"),
        ({**MINIMAL, "train": {"stpes": 3}}, "train.stpes"),
        ({**MINIMAL, "ci": {"attention": {"heads": 2}}}, "ci.attention.heads"),
        ({"sites": [{"pattern": "a", "C": 2, "c": 3}]}, "sites.0.c"),
    ],
)
def test_unknown_key_raises_config_error(raw, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    assert "unknown key" in str(err.value)
    assert key in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sites: [{pattern: linear1, C: 4}]\nlosses: {faithfullness: 1.0}\n")
    with pytest.raises(ConfigError, match="unknown key") as err:
        RunConfig.from_yaml(path)
    assert "losses.faithfullness" in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.parametrize(
    "raw",
    [
        {"sites": []},
        {"sites": [{"pattern": "a", "C": 0}]},
        {**MINIMAL, "ci": {"kind": "transformer"}},
        {**MINIMAL, "masks": {"subset_granularity": "per_token"}},
        {**MINIMAL, "minimality": {"anneal_start_frac": 0.8, "anneal_end_frac": 0.2}},
        {**MINIMAL, "losses": {"faithfulness": -1}},
        {**MINIMAL, "ci": {"hidden": [0]}},
        {**MINIMAL, "ci": {"hidden": [16, -3]}},
        {**MINIMAL, "train": {"weight_decay": 0.1}},  # adam: the decay would be ignored
        {**MINIMAL, "target": {"kind": "tms"}, "data": {"kind": "induction"}},
        {**MINIMAL, "target": {"kind": "induction"}, "data": {"kind": "tms"}},
    ],
)
def test_invalid_values_raise_config_error(raw):
    with pytest.raises(ConfigError):
        RunConfig.from_dict(raw)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_yaml(p)


# ---- 12. YAML round trip and overrides ------------------------------------------------------------
def _rich_config() -> RunConfig:
    return RunConfig.from_dict(
        {
            "seed": 7,
            "target": {"kind": "induction", "n_tokens": 10, "seq_len": 32, "max_steps": 10},
            "data": {"kind": "induction"},
            "sites": [{"pattern": "linear1", "C": 8}, {"pattern": "linear2", "C": 3}],
            "ci": {"kind": "attention", "hidden": [16, 8], "attention": {"d_attn": 4, "max_len": 64, "head": "shared_mlp"}},
            "masks": {"kind": "binomial", "n_samples": 2, "subset_granularity": "per_position", "delta_component": True},
            "losses": {"stochastic_recon_subset": 0.5, "importance_minimality": 3.0e-3, "adversarial_recon": 0.25},
            "minimality": {"p_start": 0.9, "p_end": 0.1, "eps": 1e-12},
            "output": {"divergence": "kl", "positions": [-1]},
            "train": {"steps": 123, "lr": 1.0e-3, "grad_clip": 0.5, "threads": 2},
            "eval": {"active_threshold": 0.4},
        }
    )


def test_yaml_round_trip(tmp_path):
    cfg = _rich_config()
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    back = RunConfig.from_yaml(path)
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()
    assert back.to_yaml() == cfg.to_yaml()
    assert back.minimality.eps == 1e-12 and back.output.positions == [-1]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_load_and_round_trip(path, tmp_path):
    cfg = RunConfig.from_yaml(path)
    out = tmp_path / "c.yaml"
    out.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(out) == cfg


def test_overrides_set_nested_values(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(_rich_config().to_yaml())
    cfg = RunConfig.from_yaml(
        path,
        [
            "train.steps=20",
            "losses.faithfulness=2",
            "ci.attention.d_attn=12",
            "masks.delta_component=false",
            "output.positions=[0, -1]",
            "sites.1.C=5",
            "target.max_steps=50",
            "minimality.p_end=null",
            "ci.kind = mlp",
        ],
    )
    assert cfg.train.steps == 20
    assert cfg.losses.faithfulness == 2.0
    assert cfg.ci.attention.d_attn == 12
    assert cfg.masks.delta_component is False
    assert cfg.output.positions == [0, -1]
    assert cfg.sites[1].C == 5 and cfg.sites[0].C == 8
    assert cfg.target.max_steps == 50
    assert cfg.minimality.p_end is None
    assert cfg.ci.kind == "mlp"
    # values not overridden are kept
    assert cfg.seed == 7 and cfg.masks.kind == "binomial"


def test_with_overrides_and_apply_overrides_copy():
    cfg = RunConfig.model_validate(MINIMAL)
    new = cfg.with_overrides(["train.steps=10", "seed=3"])
    assert new.train.steps == 10 and new.seed == 3
    assert cfg.train.steps == 1000 and cfg.seed == 0  # original unchanged
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2", "a.c.d=x"])
    assert out == {"a": {"b": 2, "c": {"d": "x"}}}
    assert raw == {"a": {"b": 1}}


def test_override_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        RunConfig.from_dict(MINIMAL, ["train.steps"])
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_dict(MINIMAL, ["train.stepz=3"])
    with pytest.raises(ConfigError):
        RunConfig.from_dict(MINIMAL, ["train.steps=-1"])


@pytest.mark.parametrize("override", ["seed.x=1", "sites.5.C=3", "sites.x.C=3"])
def test_bad_override_path_is_config_error(override):
    with pytest.raises(ConfigError):
        RunConfig.from_dict({**MINIMAL, "seed": 0}, [override])


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    assert tspd.ConfigError is ConfigError


def test_readme_lists_every_config_key():
    """The README's key table is generated by `tspd config-keys`; a new key must be added there."""
    from pathlib import Path

    from tspd.config import describe_keys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key, _, _ in describe_keys() if f"`{key}`" not in readme]
    assert not missing, f"README lacks {missing}; regenerate its table with `tspd config-keys`"


def test_readme_key_table_is_what_config_keys_prints(capsys):
    """Every row `tspd config-keys` prints (every section and kind) is in the README as printed, so
    a changed default or description shows up here."""
    from pathlib import Path

    from tspd.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    assert main(["config-keys"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) > 80 and any(r.startswith("| `data.facts_fraction (text)`") for r in rows)
    stale = [r for r in rows if r not in readme]
    assert not stale, f"README's key table differs from `tspd config-keys` at {stale[:3]}; regenerate it"


def test_a_key_of_another_kind_is_named_as_such():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(_recipe_path("tms-5-2"), ["target.kind=huggingface", "target.model=tiny-gpt2"])
    msg = str(err.value)
    assert "key 'target.d_hidden' belongs to target.kind tms, not the target.kind given" in msg
    assert "did you mean 'target.d_hidden'" not in msg


def _recipe_path(name: str) -> Path:
    from tspd.cli import _recipe

    return _recipe(name)


# ---- 2026-12-03 review: values that passed validation and failed (or did nothing) later -------------
def _new_run(path, overrides):
    RunConfig.from_yaml(path, overrides).check_new_run()


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr"),
    ("losses.faithfulness=.inf", "losses.faithfulness"),
    ("minimality.eps=.inf", "minimality.eps"),
    ("consolidate.prune=.inf", "consolidate.prune"),
    ("seed=99999999999999999999999", "seed"),
])
def test_numbers_no_run_can_use_are_refused_on_reading(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_yaml(CONFIGS / "tms-5-2.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("losses={faithfulness: 0, stochastic_recon: 0, stochastic_recon_layerwise: 0, importance_minimality: 0}",
     "every losses.* coefficient is 0"),
    ("output.positions=[]", "output.positions is empty"),
    ("output.positions=[-1, -1]", "lists a position twice"),
    ("train.threads=100000", "train.threads"),
    ("eval.alive_threshold=1", "eval.alive_threshold"),
    ("train.fuse_head=true", "fuses the output head with the KL only"),
    ("ci.hidden=[]", "ci.hidden is empty"),
    ("ci.kind=attention", "a tms target has none"),
    ("output.positions=[-1]", "a tms target's output has no positions"),
])
def test_nonsense_a_new_run_is_refused_but_a_saved_config_with_it_still_loads(override, message, tmp_path):
    """Refused before anything is built or moved (they failed at the first step, crashed, or did
    nothing); a finished run's config.yaml that holds one (some trained) must still load."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        _new_run(CONFIGS / "tms-5-2.yaml", [override])
    saved = tmp_path / "config.yaml"
    saved.write_text(RunConfig.from_yaml(CONFIGS / "tms-5-2.yaml", [override]).to_yaml())
    RunConfig.from_yaml(saved)


@pytest.mark.parametrize("overrides, message", [
    (["ci.attention.max_len=32"], "ci.attention.max_len 32 is shorter than the sequences (target.seq_len 64)"),
    (["output.positions=[64]"], "output.positions [64] out of range for sequences of 64 (target.seq_len)"),
    (["output.positions=[-65]"], "out of range"),
])
def test_the_induction_sequences_bound_the_attention_ci_and_positions(overrides, message):
    """Found only at the first step before, after the target had trained (minutes)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        _new_run(CONFIGS / "induction.yaml", overrides)
    _new_run(CONFIGS / "induction.yaml", ["output.positions=[-64, 63]"])  # the ends are fine


def test_text_data_bounds_positions_by_its_chunk_length():
    with pytest.raises(ConfigError, match=re.escape("out of range for sequences of 64 (data.seq_len)")):
        _new_run(CONFIGS / "smollm2-facts.yaml", ["output.positions=[70]"])


def test_every_shipped_recipe_can_start_a_run():
    for path in sorted(CONFIGS.glob("*.yaml")):
        RunConfig.from_yaml(path).check_new_run()


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    """A second `train:` block silently replaced the first (batch 16 -> 256, threads 1 -> all)."""
    path = tmp_path / "dup.yaml"
    path.write_text("sites: [{pattern: a, C: 2}]\ntrain: {steps: 3, batch_size: 16}\nseed: 5\ntrain: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping \(first at line 2\)"):
        RunConfig.from_yaml(path)
    path.write_text("sites: [{pattern: a, C: 2}]\ntrain: {steps: 3, steps: 4}\n")
    with pytest.raises(ConfigError, match="key 'steps' appears twice"):
        RunConfig.from_yaml(path)


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"bin.yaml is not UTF-8 text"):
        RunConfig.from_yaml(path)


def test_a_misspelt_section_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'losses'"):
        RunConfig.from_yaml(CONFIGS / "tms-5-2.yaml", ["lossess.faithfulness=1"])


def test_a_section_given_as_a_mapping_keeps_its_other_keys_unless_its_kind_changes():
    """`--set 'train={steps: 2}'` replaced the whole section: the recipe's batch size, lr, ... reverted."""
    recipe = RunConfig.from_yaml(CONFIGS / "induction.yaml")
    cfg = RunConfig.from_yaml(CONFIGS / "induction.yaml", ["train={steps: 2}", "ci={attention: {d_attn: 8}}"])
    assert cfg.train.steps == 2 and cfg.train.batch_size == recipe.train.batch_size and cfg.train.lr == recipe.train.lr
    assert cfg.ci.attention.d_attn == 8 and cfg.ci.kind == recipe.ci.kind and cfg.ci.attention.max_len == recipe.ci.attention.max_len
    other = RunConfig.from_yaml(CONFIGS / "smollm2-facts.yaml", ["ci={kind: mlp}"])  # another kind: the section anew
    assert other.ci.kind == "mlp" and other.ci.hidden == [16]  # the recipe's [1024] belonged to its shared_mlp
    with pytest.raises(ConfigError, match="appears twice"):
        RunConfig.from_yaml(CONFIGS / "tms-5-2.yaml", ["train={steps: 2, steps: 3}"])


def test_yaml_merge_keys_still_work_and_odd_keys_are_named(tmp_path):
    """The duplicate-key loader read `<<: *anchor` keys as duplicates ("not valid YAML")."""
    path = tmp_path / "m.yaml"
    path.write_text("sites: [{pattern: a, C: 2}]\ntrain: &t {steps: 3, batch_size: 16}\n"
                    "eval: {active_threshold: 0.4}\nconsolidate: {<<: {tol: 0.1, overlap: 0.8}, tol: 0.2}\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.consolidate.tol == 0.2 and cfg.consolidate.overlap == 0.8  # a key beside a merge overrides it
    path.write_text("sites: [{pattern: a, C: 2}]\n? [a, b]\n: 3\n")
    with pytest.raises(ConfigError, match="a key of type list cannot be a config key"):
        RunConfig.from_yaml(path)
