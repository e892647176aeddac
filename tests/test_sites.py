"""`tspd sites` and tspd.components.describe_sites: which modules a model offers as sites, with shapes."""

import json

import pytest
import torch

from tspd.cli import main
from tspd.components import describe_sites
from tspd.targets.huggingface import model_skeleton, tiny_gpt2, tiny_llama


def test_describe_sites_lists_every_decomposable_module_with_its_shape_and_ties():
    model = tiny_gpt2(vocab_size=300)
    infos = {i.name: i for i in describe_sites(model)}
    assert list(infos)[:2] == ["transformer.wte", "transformer.wpe"] and "lm_head" in infos
    assert not {n.split(".")[-1] for n in infos} & {"ln_1", "attn", "mlp", "h", "transformer"}  # LayerNorm / containers are not sites
    fc = infos["transformer.h.0.mlp.c_fc"]
    assert (fc.kind, fc.d_in, fc.d_out, fc.weight_params, fc.C) == ("conv1d", 128, 512, 128 * 512, None)
    wte = infos["transformer.wte"]
    assert (wte.kind, wte.d_in, wte.d_out) == ("embedding", 300, 128)  # an embedding's d_in is its vocabulary
    assert wte.tied_with == ("lm_head",) and infos["lm_head"].tied_with == ("transformer.wte",)
    assert infos["transformer.h.1.mlp.c_proj"].tied_with == ()


def test_describe_sites_with_patterns_gives_the_chosen_modules_and_their_factor_sizes():
    model = tiny_gpt2(vocab_size=300)
    infos = describe_sites(model, [("transformer.h.*.mlp.c_proj", 16), ("transformer.h.1.attn.c_attn", 8)])
    assert [(i.name, i.C) for i in infos] == [
        ("transformer.h.0.mlp.c_proj", 16), ("transformer.h.1.attn.c_attn", 8), ("transformer.h.1.mlp.c_proj", 16)]
    assert infos[0].factor_params == 16 * (512 + 128) and infos[1].factor_params == 8 * (128 + 384)
    with pytest.raises(ValueError, match="matches no module"):
        describe_sites(model, [("transformer.h.*.mlp.nothing", 4)])


def test_model_skeleton_of_a_folder_is_on_meta_and_has_the_real_models_sites(tmp_path):
    real = tiny_llama(vocab_size=200)
    real.save_pretrained(tmp_path)
    skeleton = model_skeleton(str(tmp_path))
    assert all(p.is_meta for p in skeleton.parameters())  # nothing read but config.json
    shapes = [(i.name, i.kind, i.d_in, i.d_out, i.tied_with) for i in describe_sites(skeleton)]
    assert shapes == [(i.name, i.kind, i.d_in, i.d_out, i.tied_with) for i in describe_sites(real)]
    assert ("model.layers.1.self_attn.k_proj", "linear", 64, 32, ()) in shapes  # grouped KV heads: 2 of 4


def test_cli_sites_of_a_recipe_a_folder_and_a_run_folder(tmp_path, capsys):
    assert main(["sites", "tms-5-2"]) == 0
    out = capsys.readouterr().out
    assert "linear1" in out and "linear2" in out and "V and U 280 (14.00x)" in out  # C 20 x (5 + 2) each

    folder = tmp_path / "model"
    tiny_llama(vocab_size=200).save_pretrained(folder)
    assert main(["sites", str(folder), "--pattern", "model.layers.*.mlp.down_proj", "--C", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["d_in"], r["d_out"], r["C"], r["factor_params"]) for r in rows] == [
        (f"model.layers.{k}.mlp.down_proj", 128, 64, 8, 8 * (128 + 64)) for k in (0, 1)]

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"target: {{kind: huggingface, model: {folder}}}\nsites:\n  - {{pattern: model.layers.0.self_attn.q_proj, C: 5}}\n")
    assert main(["sites", str(run)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "total: 1 sites" in out and "V and U 640 (0.16x)" in out  # 5 x (64 + 64) of 64 x 64


def test_cli_sites_names_what_it_accepts(tmp_path, capsys):
    assert main(["sites", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "none of: a config file, a recipe" in err and "tiny-gpt2" in err
    assert main(["sites", str(tmp_path)]) == 2
    assert "neither config.json" in capsys.readouterr().err
    assert main(["sites", "tiny-gpt2", "--pattern", "transformer.h.*.ln_1"]) == 2
    assert "not nn.Linear, GPT-2 Conv1D or nn.Embedding" in capsys.readouterr().err
    assert torch.get_default_device() == torch.device("cpu")  # the meta context did not leak
