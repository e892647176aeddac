"""Language-model runs through the CLI (tiny random GPT-2 / Llama, offline) and the facts study's
pieces: prompts and name positions, mixed data, selection, ablation masks, the SVD baseline."""

import json

import pytest
import torch
import yaml

import tspd
from tspd.analysis import facts as F
from tspd.cli import main
from tspd.data.facts import FACTS_FILE, fact_sentences, load_facts, split_athletes
from tspd.decomposition import call_target
from tspd.targets.huggingface import load_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer("tiny-gpt2")


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "notes.txt"
    paragraphs = [" ".join(fact_sentences(load_facts())[i : i + 12]) for i in range(0, 600, 12)]
    path.write_text("\n\n".join(paragraphs))
    return path


def lm_config(tmp_path, text_file, model: str, sites: list[dict], steps: int = 4) -> str:
    cfg = {
        "seed": 0,
        "target": {"kind": "huggingface", "model": model},
        "data": {"kind": "text", "source": str(text_file), "seq_len": 32, "facts_fraction": 0.25},
        "sites": sites,
        "ci": {"kind": "shared_mlp", "hidden": [16]},
        "masks": {"delta_component": True},
        "losses": {"faithfulness": 1000.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0,
                   "importance_minimality": 0.001},
        "output": {"divergence": "kl", "positions": None},
        "train": {"steps": steps, "batch_size": 4, "eval_every": steps, "checkpoint_every": 2, "eval_batches": 1,
                  "faithfulness_warmup_steps": 5},
    }
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def gpt2_run(tmp_path, text_file):
    sites = [{"pattern": "transformer.h.*.mlp.c_fc", "C": 16}, {"pattern": "transformer.h.*.mlp.c_proj", "C": 16}]
    out = tmp_path / "run"
    assert main(["decompose", lm_config(tmp_path, text_file, "tiny-gpt2", sites), "--out", str(out)]) == 0
    return out


def test_gpt2_cli_run_reproduces_the_model_with_all_ones_masks(gpt2_run):
    assert not (gpt2_run / "target.safetensors").exists()  # the config names the model; no 0.5 GB copies
    dec = tspd.load(gpt2_run)
    assert sorted(dec.site_names) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                                      "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = call_target(dec.target, ids)
        ones = dec.forward_with_ablation(ids, {})
        ablated = dec.forward_with_ablation(ids, {"transformer.h.1.mlp.c_fc": list(range(16))})
    torch.testing.assert_close(ones, target, rtol=0, atol=1e-5)
    assert (ablated - target).abs().max() > 1e-3  # and the masks do act


def test_llama_cli_run_and_resume(tmp_path, text_file):
    sites = [{"pattern": "model.layers.*.mlp.down_proj", "C": 8}]
    cfg = lm_config(tmp_path, text_file, "tiny-llama", sites, steps=4)
    out = tmp_path / "llama"
    assert main(["decompose", cfg, "--out", str(out)]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in m for m in metrics)
    assert main(["decompose", "--out", str(out), "--resume"]) == 0  # a finished run: resume only rewrites its outputs


def test_mixed_data_rows_and_heldout_athletes(text_file, tiny_tok):
    from tspd.config import HuggingFaceTargetConfig, TextDataConfig
    from tspd.data.mix import text_data

    data = text_data(TextDataConfig(source=str(text_file), seq_len=32, facts_fraction=0.5),
                     HuggingFaceTargetConfig(model="tiny-gpt2"), batch_size=8, seed=0)
    batch = data(0)
    assert batch.shape == (8, 32) and data(-1).shape == (8, 32)
    facts = load_facts()
    _, heldout = split_athletes(facts)
    text = tiny_tok.decode(batch[:4].flatten())
    assert " plays the sport of" in text or " famous for playing" in text or " competes in" in text
    assert not any(a.name in text for a in heldout), "held-out athletes leaked into training rows"
    assert torch.equal(data(0), batch)  # resumable: a batch is a function of the step
    # the facts rows come from the discovery athletes of the run's own seed, the split `facts ablate` uses
    for seed in (0, 1):
        mixed = text_data(TextDataConfig(source=str(text_file), seq_len=32, facts_fraction=0.5),
                          HuggingFaceTargetConfig(model="tiny-gpt2"), batch_size=8, seed=seed)
        trained = tiny_tok.decode(mixed.parts[0].chunks.train.flatten())
        discovery, heldout = split_athletes(facts, seed=seed)
        assert not any(a.name in trained for a in heldout), seed
        assert sum(a.name in trained for a in discovery) > 0.9 * len(discovery), seed


def test_split_is_per_sport_and_disjoint():
    facts = load_facts()
    disc, held = split_athletes(facts, seed=3)
    assert not {a.name for a in disc} & {a.name for a in held}
    for s in facts.sports:
        assert sum(a.sport == s.name for a in held) == round(len(s.athletes) / 3)


def test_prompt_name_positions(tiny_tok):
    facts = load_facts()
    kobe = next(a for a in facts.athletes if a.last == "Bryant")
    prompts = F.build_prompts(tiny_tok, [kobe], ["{name} plays the sport of", "The sport that {name} plays is"])
    for p in prompts:
        assert tiny_tok.decode([p.ids[i] for i in p.first]).strip() == "Kobe"
        assert tiny_tok.decode([p.ids[i] for i in p.last]).strip() == "Bryant"
    # a doubled brace before {name} is one character of the prompt: the offsets follow the text
    quiz = F.build_prompts(tiny_tok, [kobe], ["Quiz {{1}}: {name} plays"])[0]
    assert tiny_tok.decode(quiz.ids) == "Quiz {1}: Kobe Bryant plays"
    assert tiny_tok.decode([quiz.ids[i] for i in quiz.first]).strip() == "Kobe"
    assert tiny_tok.decode([quiz.ids[i] for i in quiz.last]).strip() == "Bryant"
    with pytest.raises(ValueError, match="braces other than {name}"):
        F.build_prompts(tiny_tok, [kobe], ["{sport}: {name}"])
    b = F.batch_prompts(prompts, pad_id=0)
    assert b.ids.shape[0] == 2 and int(b.names["both"].sum()) == sum(len(p.first + p.last) for p in prompts)
    assert torch.equal(b.names["both"], b.names["first"] | b.names["last"])
    assert [int(x) for x in b.last] == [len(p.ids) - 1 for p in prompts]


def test_prompts_and_answers_of_a_tokenizer_that_appends_eos(tiny_tok):
    """A tokenizer adding EOS (and BOS) to every text: the prompts end with their own last token,
    the name positions and answer tokens are those of the plain tokenizer, shifted past the BOS."""

    class BosEos:
        def __call__(self, text):
            return {"input_ids": [900] + list(tiny_tok(text)["input_ids"]) + [901]}

    facts = load_facts()
    athletes, templates = facts.athletes[:3], ["{name} plays the sport of", "The sport that {name} plays is"]
    plain = F.build_prompts(tiny_tok, athletes, templates)
    wrapped = F.build_prompts(BosEos(), athletes, templates)
    for p, w in zip(plain, wrapped):
        assert w.ids == [900] + p.ids
        assert w.first == [i + 1 for i in p.first] and w.last == [i + 1 for i in p.last]
    assert F.sport_tokens(BosEos(), facts.answers) == F.sport_tokens(tiny_tok, facts.answers)


def test_select_for_sport_prefers_specific_subcomponents():
    ci = {"s": torch.tensor([[0.9, 0.9, 0.1, 0.6], [0.8, 0.9, 0.0, 0.7], [0.1, 0.9, 0.0, 0.0], [0.0, 0.8, 0.1, 0.1]])}
    is_sport = torch.tensor([True, True, False, False])
    # c0: on 0.85, off 0.05 -> chosen first; c3: on 0.65, off 0.05; c1 fires for every sport; c2 never.
    assert F.select_for_sport(ci, is_sport, k=4) == [("s", 0), ("s", 3)]
    assert F.select_for_sport(ci, is_sport, k=1) == [("s", 0)]
    # prompts of one sport only: the gap is over 0
    assert F.select_for_sport(ci, torch.ones(4, dtype=torch.bool), k=2, min_ci=0.5) == [("s", 1)]  # c1: 0.875; c0: 0.45


def _ablated_forward(dec, pieces, where):
    """Reference: forward(ids, rows) through forward_with_ablation, `pieces` at mask 0 where `where[rows]`."""
    ablate = F.group(pieces)
    return lambda ids, rows: dec.forward_with_ablation(ids, ablate, positions=None if where is None else where[rows])


def _two_sports(run, tok):
    """The run's decomposition and 12 prompts: 3 athletes of each of the first two sports x 2 templates."""
    facts = load_facts()
    athletes = [a for s in facts.sports[:2] for a in s.athletes[:3]]
    batch = F.batch_prompts(F.build_prompts(tok, athletes, list(facts.templates[:2])), 0)
    return tspd.load(run), batch, torch.tensor([0] * 6 + [1] * 6), torch.tensor([5, 7])


def test_rank_by_ablation_scores_each_candidate_on_discovery_prompts(gpt2_run, tiny_tok):
    dec, batch, sport_of, answer_ids = _two_sports(gpt2_run, tiny_tok)
    site = "transformer.h.0.mlp.c_fc"
    cands = [(site, c) for c in range(6)]
    pieces, scores = F.rank_by_ablation(dec, batch, sport_of, 0, answer_ids, cands, k=2)
    assert [(r["site"], r["index"]) for r in scores] == cands
    rows = torch.arange(12)
    clean = F.answer_logprobs(_ablated_forward(dec, [], None), batch, answer_ids)[rows, sport_of]
    lp = F.answer_logprobs(_ablated_forward(dec, [cands[3]], batch.names["both"]), batch, answer_ids)[rows, sport_of]
    drop = clean - lp
    assert scores[3]["drop_own"] == pytest.approx(float(drop[:6].mean()), abs=1e-5)
    assert scores[3]["score"] == pytest.approx(float(drop[:6].mean()) - abs(float(drop[6:].mean())), abs=1e-5)
    best = sorted((r for r in scores if r["score"] > 0), key=lambda r: -r["score"])[:2]
    assert pieces == [(r["site"], r["index"]) for r in best] and len(pieces) <= 2
    # a heavier collateral weight scores the same drops as own - w |other|
    _, scores5 = F.rank_by_ablation(dec, batch, sport_of, 0, answer_ids, cands, k=2, collateral_weight=5.0)
    for r, r5 in zip(scores, scores5):
        assert r5["score"] == pytest.approx(r["drop_own"] - 5.0 * abs(r["drop_other"]), abs=1e-5)


def test_attribution_drops_match_a_finite_difference(gpt2_run, tiny_tok):
    dec, batch, sport_of, answer_ids = _two_sports(gpt2_run, tiny_tok)
    drops = F.attribution_drops(dec, batch, sport_of, answer_ids, chunk=5)  # chunks of 5, 5, 2 rows
    assert set(drops) == set(dec.site_names) and all(d.shape == (12, 16) for d in drops.values())
    rows, eps = torch.arange(12), 1e-2
    right = answer_ids[sport_of]

    def right_lp(site, c, scale):
        """Right-sport log-probability with piece (site, c) at mask `scale` on the name tokens."""
        with torch.no_grad():
            _, inputs = dec.run_target(batch.ids)
            ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
            p = dec.ones_pass(ci)
            p.masks[site][..., c] = torch.where(batch.names["both"], scale, 1.0)
            return F.last_logprobs(dec.run_pass(batch.ids, p), batch.last)[rows, right]

    # layer 1 is the last block: its MLP at the name tokens cannot reach the last position
    assert float(drops["transformer.h.1.mlp.c_proj"].abs().max()) == 0.0
    for site, c in (("transformer.h.0.mlp.c_fc", 3), ("transformer.h.0.mlp.c_proj", 7)):
        fd = (right_lp(site, c, 1.0) - right_lp(site, c, 1.0 - eps)) / eps  # drop per unit of mask removed
        assert torch.allclose(drops[site][:, c], fd, rtol=0.05, atol=2e-4), (site, c)
        assert float(fd.abs().max()) > 1e-4  # the piece does move the answer, so the check has teeth


def test_select_by_attribution_needs_ci_and_a_positive_estimate():
    drops = {"s": torch.tensor([[0.3, 0.5, 0.2, -0.1], [0.3, 0.5, 0.2, -0.1], [0.0, 0.4, 0.0, 0.0], [0.0, 0.4, 0.0, 0.0]])}
    ci = {"s": torch.tensor([[0.9, 0.9, 0.1, 0.9]] * 4)}
    is_sport = torch.tensor([True, True, False, False])
    # c0: own 0.3, other 0 -> 0.3; c1: 0.5 - 0.4 = 0.1; c2 has CI 0.1 < 0.25; c3 is negative.
    assert F.select_by_attribution(drops, ci, is_sport, n=4) == [("s", 0), ("s", 1)]
    assert F.select_by_attribution(drops, ci, is_sport, n=4, collateral_weight=2.0) == [("s", 0)]
    assert F.select_by_attribution(drops, ci, is_sport, n=1, min_ci=0.05) == [("s", 0)]


def test_best_prefix_scores_joint_ablations_and_keeps_the_best(gpt2_run, tiny_tok):
    dec, batch, sport_of, answer_ids = _two_sports(gpt2_run, tiny_tok)
    site = "transformer.h.0.mlp.c_fc"
    ranked = [(site, c) for c in (4, 1, 2)]
    rows = torch.arange(12)
    clean = F.answer_logprobs(_ablated_forward(dec, [], None), batch, answer_ids)[rows, sport_of]
    chosen, scores = F.best_prefix(dec, batch, sport_of, 0, answer_ids, ranked, clean, collateral_weight=2.0)
    assert [r["size"] for r in scores] == [1, 2, 3]
    # the size-2 score is the joint ablation of the first two pieces, not the sum of singles
    lp = F.answer_logprobs(_ablated_forward(dec, ranked[:2], batch.names["both"]), batch, answer_ids)[rows, sport_of]
    drop = clean - lp
    assert scores[1]["score"] == pytest.approx(float(drop[:6].mean()) - 2.0 * abs(float(drop[6:].mean())), abs=1e-5)
    best = max(scores, key=lambda r: r["score"])
    assert chosen == ranked[: best["size"]]
    assert F.best_prefix(dec, batch, sport_of, 0, answer_ids, [], clean) == ([], [])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_output_head_at_last_positions_only_gives_the_same_answer_logprobs(name, tiny_tok):
    model, _ = load_lm(name)
    facts = load_facts()
    batch = F.batch_prompts(F.build_prompts(tiny_tok, facts.athletes[:5], list(facts.templates[:3])), 0)
    answers = torch.tensor([3, 9, 11])
    full = F.answer_logprobs(lambda ids, rows: model(ids).logits, batch, answers, chunk=4)
    calls = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    fast = F.answer_logprobs(lambda ids, rows: model(ids).logits, batch, answers, chunk=4, model=model)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)
    assert calls and all(c[1] == 1 for c in calls)  # the head saw one position per prompt
    assert model.get_output_embeddings() is head  # restored


def test_text_effect_matches_forward_with_ablation(gpt2_run):
    from tspd.analysis.facts_study import _text_effect

    dec = tspd.load(gpt2_run)
    ids = torch.randint(0, 500, (5, 12), generator=torch.Generator().manual_seed(4))
    pieces = [("transformer.h.1.mlp.c_fc", 2), ("transformer.h.1.mlp.c_fc", 5), ("transformer.h.0.mlp.c_proj", 1)]
    got = _text_effect(dec, ids, pieces, chunk=2)
    with torch.no_grad():
        t = dec.target(ids).logits
        a = dec.forward_with_ablation(ids, F.group(pieces))
    assert got["kl"] == pytest.approx(float(F.kl_per_token(t, a).mean()), rel=1e-4, abs=1e-7)
    assert got["kl"] > 0
    # without the delta component the reference is the unablated decomposition, not the target:
    # no pieces, no effect, although V U differs from W
    dec.config.masks.delta_component = False
    for stand_in in dec._stand_ins.values():
        stand_in.use_delta = False
    assert _text_effect(dec, ids, [], chunk=2) == {"kl": 0.0, "ce_change": 0.0}
    with torch.no_grad():
        ones = dec.forward_with_ablation(ids, {})
        a = dec.forward_with_ablation(ids, F.group(pieces))
    assert float(F.kl_per_token(t, ones).mean()) > 1e-6  # the decomposition's own error, left out
    got = _text_effect(dec, ids, pieces, chunk=2)
    assert got["kl"] == pytest.approx(float(F.kl_per_token(ones, a).mean()), rel=1e-4, abs=1e-7)


def test_ablation_at_chosen_tokens_only(gpt2_run):
    dec = tspd.load(gpt2_run)
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(2))
    where = torch.zeros(2, 10, dtype=torch.bool)
    where[0, 4] = True
    site = "transformer.h.0.mlp.c_fc"
    with torch.no_grad():
        ones = dec.forward_with_ablation(ids, {})
        out = dec.forward_with_ablation(ids, {site: list(range(16))}, positions=where)
    assert torch.equal(out[1], ones[1])  # the other example is untouched
    assert torch.equal(out[0, :4], ones[0, :4])  # causal: earlier positions untouched
    assert (out[0, 4:] - ones[0, 4:]).abs().max() > 1e-4


def test_svd_baseline_removes_the_top_directions(gpt2_run):
    dec = tspd.load(gpt2_run)
    site = "transformer.h.0.mlp.c_fc"
    module = dict(dec.target.named_modules())[site]
    x = torch.randn(1, 3, module.weight.shape[0])
    where = torch.tensor([[True, False, True]])
    with torch.no_grad():
        before = module(x)
        with F.svd_removed(dec, {site: module.weight.shape[0]}, where, [slice(None)]):  # full rank: all removed
            after = module(x)
    torch.testing.assert_close(after[0, 0], module.bias, atol=1e-4, rtol=0)
    torch.testing.assert_close(after[0, 1], before[0, 1])
    # k = 1 removes exactly the largest singular direction (not any other one)
    W = module.weight.detach().T  # Conv1D: (d_out, d_in) in nn.Linear layout
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad(), F.svd_removed(dec, {site: 1}, where, [slice(None)]):
        top1 = module(x)
    expected = before[0, 2] - (x[0, 2] @ Vh[0]) * S[0] * U[:, 0]
    torch.testing.assert_close(top1[0, 2], expected, atol=1e-5, rtol=1e-5)
    assert (before[0, 2] - top1[0, 2]).norm() > 1e-3  # something was removed, ~1000x the tolerance above


def test_facts_pipeline_on_a_tiny_run(gpt2_run, tmp_path):
    from tspd.analysis.facts_study import facts_ablate, scan_model, screen_model

    scr = screen_model("tiny-gpt2", tmp_path / "screen")
    assert set(scr["accuracy"]) == set(load_facts().answers) and 0 <= scr["overall"] <= 1
    assert len(json.loads((tmp_path / "screen" / "screen.json").read_text())["prompts"]) == len(facts_all := load_facts().athletes) * 6 and len(facts_all) == 320
    model, tok = load_lm("tiny-gpt2")
    facts = load_facts()
    prompts = F.build_prompts(tok, facts.athletes[:8], list(facts.templates[:2]))
    answers = F.sport_tokens(tok, facts.answers)
    batch = F.batch_prompts(prompts, 0)
    scan = F.layer_scan(model, batch, torch.tensor([answers[p.athlete.sport] for p in prompts]))
    assert len(scan["mlp"]) == len(scan["attn"]) == 2 and any(abs(v) > 0 for v in scan["mlp"])
    scan_out = scan_model("tiny-gpt2", tmp_path / "scan")
    assert (tmp_path / "scan" / "scan.png").exists() and scan_out["n_prompts"] > 0
    # a facts file of our own: the shipped athletes with the templates whose name is not first, and one more
    inner = [t for t in facts.templates if not t.startswith("{name}")] + ["In short, {name} plays the sport of"]
    raw = json.loads(FACTS_FILE.read_text())
    own = tmp_path / "inner-facts.json"
    own.write_text(json.dumps({**raw, "templates": inner}))
    result = facts_ablate(gpt2_run, k=2, n_random=2, n_text=8, min_ci=0.0, min_gap=0.0, progress=False,
                          choose_size=True, out_dir=tmp_path / "k2", select="attribution", name_at_start=False,
                          facts_file=own)
    # only prompts whose name is not their first token, from the file's templates: at most held-out athletes x 3
    assert 0 < result["n_heldout_prompts"] <= len(split_athletes(facts, seed=0)[1]) * len(inner) and not result["name_at_start"]
    assert result["facts_file"] == str(own) and "inner-facts.json" in (tmp_path / "k2" / "facts.html").read_text()
    assert set(result["sports"]) == set(facts.answers) and result["choose_size"] and result["select"] == "attribution"
    assert result["faithfulness"]["active_per_token"] >= 0
    # outputs go to out_dir, and the run folder is left as it was
    assert json.loads((tmp_path / "k2" / "facts.json").read_text())["k"] == 2 and "gradient" in (tmp_path / "k2" / "facts.html").read_text()
    assert not (gpt2_run / "facts.json").exists()
    done = [r for r in result["sports"].values() if "both" in r]
    for r in done:
        assert len(r["pieces"]) <= 2 and r["text"]["kl"] >= 0
        assert len(r["pieces"]) == max(r["prefixes"], key=lambda p: p["score"])["size"]
        lo, hi = r["bootstrap"]["target_effect"]
        assert lo <= hi and 0 <= r["bootstrap"]["pass_fraction"] <= 1


def test_name_inside_facts_keep_the_shipped_athletes():
    """facts_name_inside.json repeats the shipped sports so that --facts with it splits the same
    athletes; this keeps the copy from drifting. Its names never start a prompt."""
    inside = load_facts(FACTS_FILE.with_name("facts_name_inside.json"))
    assert inside.sports == load_facts().sports
    assert all(not t.startswith("{name}") for t in inside.templates) and len(inside.templates) == 6


def test_own_facts_file(tmp_path):
    from tspd.analysis.facts_study import screen_model

    own = tmp_path / "facts.json"
    own.write_text(json.dumps({"templates": ["Fact: {name} plays"], "sports": [
        {"name": "golf", "answer": " golf", "athletes": ["Tiger Woods", "Rory McIlroy"]},
        {"name": "chess", "answer": " chess", "athletes": ["Magnus Carlsen", "Judit Polgar", "Garry Kasparov"]}]}))
    facts = load_facts(own)
    assert [s.name for s in facts.sports] == ["golf", "chess"] and facts.prompts()[2].text == "Fact: Magnus Carlsen plays"
    scr = screen_model("tiny-gpt2", tmp_path / "screen", facts_file=own)
    assert set(scr["accuracy"]) == {"golf", "chess"}
    assert len(json.loads((tmp_path / "screen" / "screen.json").read_text())["prompts"]) == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_facts(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"templates": ["{name} plays"]}')
    with pytest.raises(ValueError, match="missing key.*sports"):
        load_facts(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_facts(tmp_path / "bad.json")


def test_bootstrap_effect_resamples_athletes():
    # sport 0: athletes a (2 prompts) and b (1 prompt), every prompt loses 1 nat; other sports:
    # c loses nothing, d loses 0.1. Effect is always 1; collateral lies in [0, 0.1].
    delta = torch.tensor([-1.0, -1.0, -1.0, 0.0, -0.1])
    sport = torch.tensor([0, 0, 0, 1, 2])
    names = ["a", "a", "b", "c", "d"]
    b = F.bootstrap_effect(delta, sport, names, 0, random_effect=0.1, n=500)
    assert b["n_athletes"] == 2
    assert b["target_effect"] == pytest.approx([1.0, 1.0])
    lo, hi = b["collateral_facts"]
    assert 0.0 <= lo <= hi <= 0.1 + 1e-6 and hi > lo
    assert b["pass_fraction"] == 1.0  # 1 >= 5 x 0.1 and 1 >= 3 x 0.1 in every resample
    assert F.bootstrap_effect(delta, sport, names, 0, random_effect=0.5, n=100)["pass_fraction"] == 0.0
    # the other sport's resamples: collateral 0.1 only when d is drawn twice -> 1 < 5 x 0.1 fails some
    mixed = F.bootstrap_effect(torch.tensor([-0.4, -0.4, 0.0, -0.1]), torch.tensor([0, 0, 1, 1]), ["a", "b", "c", "d"], 0,
                               random_effect=0.0, n=2000)
    assert 0.6 < mixed["pass_fraction"] < 0.9  # fails only when both draws are d (p = 1/4)
    with pytest.raises(ValueError, match="other sport"):
        F.bootstrap_effect(delta[:3], sport[:3], names[:3], 0, random_effect=0.0)


def test_dashboard_adapter_for_language_model_runs(gpt2_run):
    from tspd.app.adapters import adapter_for

    dec = tspd.load(gpt2_run)
    adapter = adapter_for(dec, gpt2_run)
    ids = adapter.encode("Tiger Woods plays the sport of")
    assert adapter.prompt_of(ids[0]) == "Tiger Woods plays the sport of"
    sample = adapter.sample(3, seed=0)
    assert sample.shape == (3, 32) and adapter.readout("transformer.h.0.mlp.c_proj").shape[1] == len(load_tokenizer("tiny-gpt2"))


def test_ablate_names_a_model_that_knows_no_fact(gpt2_run, tmp_path, monkeypatch):
    from tspd.analysis import facts_study

    monkeypatch.setattr(facts_study, "known_prompts", lambda prompts, scr, share: [])
    with pytest.raises(ValueError, match="gets no discovery and no held-out prompt right"):
        facts_study.facts_ablate(gpt2_run, k=1, n_random=1, n_text=2, progress=False, out_dir=tmp_path / "x")


def test_ablate_refuses_a_facts_file_whose_heldout_athletes_were_trained_on(gpt2_run, tmp_path):
    """The run mixed the shipped discovery athletes' facts into its data; a facts file whose split
    holds some of them out would judge the run on facts it was trained on."""
    from tspd.analysis.facts_study import facts_ablate

    raw = json.loads(FACTS_FILE.read_text())
    own = tmp_path / "reordered.json"
    own.write_text(json.dumps({**raw, "sports": [{**s, "athletes": s["athletes"][::-1]} for s in raw["sports"]]}))
    with pytest.raises(ValueError, match="held-out athletes of the facts file .* had their facts in this run's"):
        facts_ablate(gpt2_run, k=1, n_random=1, n_text=2, progress=False, facts_file=own, out_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "facts.json").exists()


def test_seq_len_beyond_the_models_context_is_named(tmp_path, text_file, capsys):
    sites = [{"pattern": "transformer.h.0.mlp.c_fc", "C": 4}]
    cfg = lm_config(tmp_path, text_file, "tiny-gpt2", sites)
    assert main(["decompose", cfg, "--out", str(tmp_path / "r"), "--set", "data.seq_len=200"]) == 2
    assert "data.seq_len 200 is longer than the model's context (128 positions)" in capsys.readouterr().err
