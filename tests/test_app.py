"""The dashboard's library and JSON API (issue 7): adapters, harvest, prompt analysis, ablation,
subcomponent view, and the validation of bad requests. The browser test is test_app_browser.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sqlite3
import urllib.request
from urllib.error import HTTPError

import pytest
import torch

import tspd
from conftest import make_cfg
from tspd.app.adapters import CausalLMAdapter, FeatureAdapter, InductionAdapter, PromptError
from tspd.app.harvest import DB_NAME, harvest, prompt_ci
from tspd.app.server import make_server
from tspd.app.session import AppError, RunSession
from tspd.data.induction import InductionTask


# ---- adapters ---------------------------------------------------------------------------
def test_induction_adapter_parses_prompts_and_names_each_error():
    a = InductionAdapter(InductionTask(n_tokens=8, seq_len=6))
    assert a.encode("bos 1, 2 s").tolist() == [[8, 1, 2, 9]]
    assert a.encode("3 S").tolist() == [[8, 3, 9]]  # BOS put in front
    with pytest.raises(PromptError, match="'9'.*not in the vocabulary"):
        a.encode("1 9")
    with pytest.raises(PromptError, match="7 tokens but the model's context is 6"):
        a.encode("1 2 3 4 5 6")
    with pytest.raises(PromptError, match="empty"):
        a.encode("  ")
    with pytest.raises(PromptError, match="'²'.*not in the vocabulary"):  # '²'.isdigit() is True
        a.encode("3 ² S")
    for word in ("\u0661", "1_0", "+1", "-1"):
        with pytest.raises(PromptError, match="not in the vocabulary"):
            a.encode(f"3 {word} S")
    # the example prompt the page analyses on load fits the task's vocabulary and context
    for n_tokens, seq_len in ((128, 64), (8, 8), (8, 4), (20, 16)):
        b = InductionAdapter(InductionTask(n_tokens=n_tokens, seq_len=seq_len))
        ids = b.encode(b.example_prompt)[0].tolist()
        assert ids[0] == b.task.bos and ids[-1] == b.task.special and len(ids) <= seq_len
    assert InductionAdapter(InductionTask(n_tokens=128, seq_len=64)).example_prompt == "BOS 7 3 S 42 11 5 9 S"


def test_feature_adapter_parses_index_value_pairs():
    a = FeatureAdapter(4, lambda n, gen: torch.rand(n, 4, generator=gen))
    assert a.encode("0:0.5 3").tolist() == [[0.5, 0.0, 0.0, 1.0]]
    assert a.input_labels(a.encode("0:0.5 3")[0]) == ["0:0.5 3:1"]
    with pytest.raises(PromptError, match="out of range"):
        a.encode("4:1")
    with pytest.raises(PromptError, match="not index:value"):
        a.encode("a:b")
    with pytest.raises(PromptError, match=r"feature 0 is given twice \('0:1' and '0:2'\)"):
        a.encode("0:1 0:2")
    # Only ASCII digits: int() and float() also read '1_1' (as 11) and other scripts' digits.
    for word in ("1_1", "1_1:1", "\u0661:1", "0:1_000", "0:\u0661.\u0665", "+1:1", "0x1:1", "\u00b2:1"):
        with pytest.raises(PromptError, match="is not index:value"):
            a.encode(word)
    assert a.encode("0:+.5 1:-25e-1 2:7.").tolist() == [[0.5, -2.5, 7.0, 0.0]]
    with pytest.raises(PromptError, match="out of range"):
        a.encode("-1:1")
    assert torch.equal(a.sample(3, seed=1), a.sample(3, seed=1))


# ---- harvest ----------------------------------------------------------------------------
def test_harvest_statistics_match_a_direct_computation(induction_run):
    dec = tspd.load(induction_run)
    adapter = InductionAdapter(InductionTask(8, 8), dec.target)
    _, ci, _ = prompt_ci(dec, adapter.sample(100, dec.config.seed))
    site = "blocks.1.attn.v_proj"
    g = ci[site]  # (100, 8, C)
    con = sqlite3.connect(induction_run / DB_NAME)
    rows = con.execute("SELECT idx, frequency, mean_ci, max_ci, hist FROM subcomponents WHERE site = ? ORDER BY idx",
                       (site,)).fetchall()
    assert len(rows) == g.shape[-1]
    for c, freq, mean_ci, max_ci, hist in rows:
        assert freq == pytest.approx(float((g[..., c] > 0.5).float().mean()), abs=1e-6)
        assert mean_ci == pytest.approx(float(g[..., c].mean()), abs=1e-5)
        assert max_ci == pytest.approx(float(g[..., c].max()), abs=1e-6)
        assert sum(json.loads(hist)) == 100 * 8
        ctx = con.execute("SELECT c.example, c.position, c.ci, c.ci_row FROM contexts c WHERE site = ? AND idx = ? "
                          "ORDER BY rank", (site, c)).fetchall()
        values = [v for _, _, v, _ in ctx]
        assert values == sorted(values, reverse=True) and len(values) <= 20
        if ctx:
            assert values[0] == pytest.approx(max_ci, abs=1e-6)
            example, position, value, ci_row = ctx[0]
            assert json.loads(ci_row)[position] == pytest.approx(value, abs=1e-3)
            assert float(g[example, position, c]) == pytest.approx(value, abs=1e-6)
    con.close()


# ---- prompt analysis and ablation ---------------------------------------------------------
@pytest.fixture(scope="module")
def induction_session(induction_run):
    return RunSession(induction_run)


def test_analyse_lists_active_subcomponents_and_the_target_predictions(induction_session):
    s = induction_session
    prompt = "BOS 1 2 S 3 4 S"
    a = s.analyse(prompt, top_k=3)
    assert a["tokens"] == ["BOS", "1", "2", "S", "3", "4", "S"]
    _, ci, _ = prompt_ci(s.dec, s.adapter.encode(prompt))
    for site in a["sites"]:
        g = ci[site["site"]][0]
        expected = {c for c in range(g.shape[1]) if float(g[:, c].max()) > s.threshold}
        assert {r["idx"] for r in site["rows"]} == expected
    logits = s.dec.target(s.adapter.encode(prompt))[0]
    for pos, preds in enumerate(a["predictions"]):
        assert preds[0]["id"] == int(logits[pos].argmax())
        values = [p["value"] for p in preds]
        assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1.0001


def test_ablation_matches_the_library_and_respects_causality(induction_session):
    s = induction_session
    prompt, site = "BOS 1 2 S 3 4 S", "blocks.1.attn.v_proj"
    r = s.ablate(prompt, [{"site": site, "idx": 1, "positions": None}], top_k=3)
    expected = s.dec.forward_with_ablation(s.adapter.encode(prompt), {site: [1]})[0, -1].softmax(-1)
    for change in r["changes"][-1]:
        assert change["after"] == pytest.approx(float(expected[change["id"]]), rel=1e-3, abs=1e-6)
    assert max(r["divergence"]["per_position"]) > 0
    # The target is causal: ablating at position 4 leaves positions 0..3 exactly as they were.
    r = s.ablate(prompt, [{"site": site, "idx": c, "positions": [4]} for c in range(4)])
    kl = r["divergence"]["per_position"]
    assert kl[:4] == [0.0] * 4 and kl[4] > 0
    assert r["divergence"]["kind"] == "kl" and len(r["target_vs_unablated"]) == 7


def test_subcomponent_effects_follow_the_unembedding(induction_session):
    s = induction_session
    d = s.subcomponent("blocks.1.attn.v_proj", "2")
    comps = s.dec.component("blocks.1.attn.v_proj")
    u, v = comps.U[2].detach(), comps.V[:, 2].detach()
    target = s.dec.target
    assert d["norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    con = sqlite3.connect(s.run_dir / DB_NAME)
    (sign,) = con.execute("SELECT inner_sign FROM subcomponents WHERE site = ? AND idx = 2", ("blocks.1.attn.v_proj",)).fetchone()
    con.close()
    assert d["effects"]["sign_from_harvest"] == (sign != 0)
    with torch.no_grad():
        direct = (sign or 1.0) * (u @ target.blocks[1].attn.o_proj.weight.T @ target.unembed.weight.T)
    assert [e["label"] for e in d["effects"]["raises"][:3]] == [s.adapter.output_label(i) for i in direct.topk(3).indices.tolist()]
    assert d["effects"]["lowers"][0]["value"] == pytest.approx(float(direct.min()), rel=1e-3)
    assert s.subcomponent("blocks.0.attn.q_proj", 0)["effects"] is None  # queries never reach the logits directly
    assert d["harvest"]["contexts"] and len(d["harvest"]["hist"]) == 20


def test_random_example_prompts_encode_back_to_the_dataset_example(induction_session, tms_run):
    s = induction_session
    assert torch.equal(s.adapter.encode(s.sample_prompt("5")["prompt"])[0], s.adapter.sample(1, 5)[0])
    t = RunSession(tms_run)
    # TMS inputs are sparse (most examples all zero); a random example has some feature on
    for seed in range(20):
        x = t.adapter.example(seed)
        assert x.any()
        assert torch.allclose(t.adapter.encode(t.sample_prompt(seed)["prompt"])[0], x, atol=5e-3)
    with pytest.raises(AppError, match="'seed' must be an integer"):
        s.sample_prompt("x")


@pytest.mark.parametrize("site, idx, status, phrase", [
    ("blocks.9.attn.q_proj", 0, 404, "unknown site"), ("blocks.0.attn.q_proj", 4, 404, "unknown subcomponent"),
    ("blocks.0.attn.q_proj", "x", 400, "not an integer"), ("blocks.0.attn.q_proj", True, 400, "not an integer"),
])
def test_subcomponent_ids_are_validated(induction_session, site, idx, status, phrase):
    with pytest.raises(AppError, match=phrase) as err:
        induction_session.subcomponent(site, idx)
    assert err.value.status == status


def test_tms_run_treats_the_input_as_one_feature_vector(tms_run):
    s = RunSession(tms_run)
    a = s.analyse("0:1 3:0.5")
    assert a["tokens"] == ["0:1 3:0.5"] and len(a["predictions"]) == 1
    x = torch.tensor([[1.0, 0, 0, 0.5, 0]])
    with torch.no_grad():
        out = s.dec.target(x)[0]
    assert a["predictions"][0][0]["value"] == pytest.approx(float(out.max()), rel=1e-3)
    r = s.ablate("0:1 3:0.5", [{"site": "linear1", "idx": c, "positions": [0]} for c in range(20)])
    assert r["divergence"]["kind"] == "mse"
    unablated = s.dec.forward_with_ablation(x, {})[0]  # the decomposed weights, every mask 1
    without_w1 = torch.relu(s.dec.target.linear2.bias.detach())  # every subcomponent of linear1 gone: ReLU(b)
    assert r["divergence"]["per_position"][0] == pytest.approx(float((unablated - without_w1).pow(2).mean()), rel=1e-3)
    with pytest.raises(AppError, match="outside the prompt"):
        s.ablate("0:1", [{"site": "linear1", "idx": 0, "positions": [1]}])
    d = s.subcomponent("linear1", 0)
    effect = (s.dec.component("linear1").U[0] @ s.dec.target.linear2.weight.T).detach()  # through linear2
    assert d["harvest"] is None and not d["effects"]["sign_from_harvest"]
    assert [e["value"] for e in d["effects"]["raises"]] == pytest.approx(sorted(effect[effect > 0].tolist(), reverse=True), rel=1e-3)
    assert [e["value"] for e in d["effects"]["lowers"]] == pytest.approx(sorted(effect[effect < 0].tolist()), rel=1e-3)


# ---- a Hugging Face causal LM with a hand-made tokenizer ------------------------------------
class CharTokenizer:
    """Characters a-z, space and '.', ids 0..27."""

    chars = "abcdefghijklmnopqrstuvwxyz ."

    def encode(self, text):
        return [self.chars.index(ch) for ch in text.lower() if ch in self.chars]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_causal_lm_adapter_serves_a_tiny_gpt2(tmp_path):
    from tspd.targets.huggingface import tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=28, n_positions=16)
    cfg = make_cfg([("transformer.h.0.mlp.c_fc", 4), ("transformer.h.0.mlp.c_proj", 4)],
                   train={"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "log_every": 1})
    data = lambda step: torch.randint(0, 28, (4, 12), generator=torch.Generator().manual_seed(step))  # noqa: E731
    tspd.decompose(model, data, cfg, run_dir=tmp_path, progress=False)
    texts = ["the cat sat on the mat. the dog sat on the log. " * 3]
    adapter = CausalLMAdapter(model, CharTokenizer(), texts, window=12, example_prompt="the cat")
    s = RunSession(tmp_path, adapter)
    a = s.analyse("the cat")
    assert a["tokens"] == list("the cat") and len(a["predictions"]) == 7
    with pytest.raises(AppError, match="17 tokens but the model's context is 16"):
        s.analyse("a" * 17)
    r = s.ablate("the cat", [{"site": "transformer.h.0.mlp.c_proj", "idx": 0, "positions": [-1]}])
    assert r["divergence"]["per_position"][:6] == [0.0] * 6
    assert s.subcomponent("transformer.h.0.mlp.c_fc", 0)["effects"] is None
    effects = s.subcomponent("transformer.h.0.mlp.c_proj", 0)["effects"]
    assert 0 < len(effects["lowers"]) <= 10 and all(e["value"] < 0 for e in effects["lowers"])
    summary = harvest(tmp_path, adapter, n_examples=16, dec=s.dec)
    assert summary["positions"] == 12
    contexts = s.subcomponent("transformer.h.0.mlp.c_proj", 0)["harvest"]["contexts"]
    assert contexts and all(len(c["tokens"]) == 12 for c in contexts)
    example = adapter.sample(1, 4)[0]
    assert adapter.encode(s.sample_prompt(4)["prompt"])[0].tolist() == example.tolist()
    with pytest.raises(AppError, match="not valid Unicode text") as err:  # a JSON "\ud800": was a 500
        s.analyse("the \ud800cat")
    assert err.value.status == 400
    bare = RunSession(tmp_path, CausalLMAdapter(model, CharTokenizer(), [], window=12))  # the serve-from-Python route
    with pytest.raises(AppError, match="no random example") as err:
        bare.sample_prompt(1)
    assert err.value.status == 409


class BOSCharTokenizer(CharTokenizer):
    """Like Llama's: encode() puts BOS (id 27, '.') first unless add_special_tokens=False."""

    bos_token_id, add_bos_token = 27, True

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + super().encode(text)


def test_causal_lm_adapter_puts_one_bos_with_a_tokenizer_that_adds_its_own():
    from tspd.targets.huggingface import tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=28, n_positions=16)
    adapter = CausalLMAdapter(model, BOSCharTokenizer(), ["ab cd " * 10, "ef gh " * 10], window=12, bos_id=27)
    assert adapter.encode("ab")[0].tolist() == [27, 0, 1]
    assert 27 not in adapter.sample(8, 0).flatten().tolist()  # no BOS at document starts (as training chunks)


# ---- the HTTP API -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(dashboard_root, induction_run, tms_run, tmp_path_factory):
    """A server over a folder of runs: the two tiny runs and one broken run folder."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(induction_run, root / "induction")
    shutil.copytree(tms_run, root / "tms")
    shutil.copytree(tms_run, root / "broken")
    (root / "broken" / "config.yaml").write_text("sites: []\n")
    shutil.copytree(tms_run, root / "corrupt")
    (root / "corrupt" / "decomposition.safetensors").write_bytes(b"not a safetensors file")
    server = make_server(root, port=0)
    server.start_background()
    yield server.url.rstrip("/")
    server.shutdown()
    server.server_close()


def scale_factors(run, factor: float) -> None:
    """Replace the run's decomposition with one whose U factors are `factor` times as large (every
    norm ‖u‖·‖v‖ scales by it), written as tspd writes files: a new file renamed into place."""
    from safetensors.torch import load_file, save_file

    path = run / "decomposition.safetensors"
    state = {k: v * factor if k.endswith(".U") else v for k, v in load_file(path).items()}
    save_file(state, run / "new.safetensors")
    os.replace(run / "new.safetensors", path)


def call(base, path, body=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, res.headers, res.read()
    except HTTPError as err:
        return err.code, err.headers, err.read()


def test_api_serves_the_page_and_every_endpoint(api):
    status, headers, page = call(api, "/")
    assert status == 200 and b"tspd dashboard" in page
    for name in ("app.js", "style.css"):
        status, _, text = call(api, f"/static/{name}")
        # No CDN: the only absolute URL in the page's assets is the SVG namespace.
        assert status == 200 and set(re.findall(rb"https?://[^\s\"'`)]+", page + text)) <= {b"http://www.w3.org/2000/svg"}
    assert call(api, "/static/../session.py")[0] == 404 and call(api, "/static/.hidden")[0] == 404
    runs = json.loads(call(api, "/api/runs")[2])["runs"]
    assert sorted(runs) == ["broken", "corrupt", "induction", "tms"]
    info = json.loads(call(api, "/api/run?run=induction")[2])
    assert info["input_kind"] == "tokens" and info["context_length"] == 8 and info["harvest"]["n_examples"] == 100
    assert "census" in info["tables"] and not info["harvest"]["stale"]
    metrics = json.loads(call(api, "/api/metrics?run=induction")[2])
    assert metrics["train"]["step"] == list(range(6)) and metrics["eval"]["step"] == [2, 5]
    assert set(metrics["train"]["losses"]) >= {"loss", "faithfulness", "importance_minimality"}
    assert json.loads(call(api, "/api/tables?run=induction")[2])["census"]["n_sequences"] == 100
    status, headers, body = call(api, "/api/prompt?run=induction", {"prompt": "1 S 2 S"})
    assert status == 200 and json.loads(body)["tokens"] == ["BOS", "1", "S", "2", "S"]
    assert headers["Server-Timing"].startswith("app;dur=")
    items = json.loads(call(api, "/api/subcomponents?run=induction&site=blocks.0.attn.k_proj")[2])["items"]
    assert len(items) == 4 and [i["frequency"] for i in items] == sorted((i["frequency"] for i in items), reverse=True)
    status, _, body = call(api, "/api/prompt?run=induction&top_k=3", {"prompt": "1 S"})  # top_k in the query string
    assert status == 200, body
    body = {"run": "tms", "prompt": "1", "ablations": [{"site": "linear2", "idx": 0}], "base": "ci"}
    assert json.loads(call(api, "/api/ablate", body)[2])["base"] == "ci"


@pytest.mark.parametrize("path, body, status, phrase", [
    ("/api/run?run=nope", None, 404, "no run folder 'nope'"),
    ("/api/run?run=../induction", None, 404, "no run folder"),
    ("/api/run?run=broken", None, 422, "could not be loaded"),
    ("/api/run?run=corrupt", None, 422, "could not be loaded"),
    ("/api/prompt?run=tms", {"prompt": "0:1e40"}, 400, "not a finite fp32 number"),
    ("/api/prompt?run=tms", {"prompt": "3:nan"}, 400, "not a finite fp32 number"),
    ("/api/prompt?run=induction&top_k=0", {"prompt": "1"}, 400, "top_k"),
    ("/api/run", None, 400, "give the run"),
    ("/api/prompt?run=induction", {"prompt": "1 " * 8}, 400, "context is 8"),
    ("/api/prompt?run=induction", {"prompt": "1 2 99"}, 400, "not in the vocabulary"),
    ("/api/prompt?run=induction", {"prompt": 5}, 400, "must be a string"),
    ("/api/prompt?run=induction", {"prompt": "1", "top_k": 0}, 400, "top_k"),
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj&idx=17", None, 404, "unknown subcomponent"),
    ("/api/subcomponent?run=induction&site=nope&idx=0", None, 404, "unknown site"),
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj", None, 400, "not an integer"),
    ("/api/ablate?run=induction", {"prompt": "1 S", "ablations": []}, 400, "non-empty list"),
    ("/api/ablate?run=induction", {"prompt": "1 S", "ablations": [{"site": "blocks.0.attn.q_proj", "idx": 9}]}, 404,
     "unknown subcomponent"),
    ("/api/ablate?run=induction", {"prompt": "1 S", "ablations": [{"site": "blocks.0.attn.q_proj", "idx": 0,
                                                                    "positions": [3]}]}, 400, "outside the prompt"),
    ("/api/ablate?run=induction", {"prompt": "1", "ablations": [{"site": "blocks.0.attn.q_proj", "idx": 0}],
                                   "base": "zero"}, 400, "'base'"),
    ("/api/prompt?run=induction", b"{not json", 400, "not valid JSON"),
    ("/api/prompt?run=induction", b"[1]", 400, "JSON object"),
    ("/api/sample?run=induction&seed=1.5", None, 400, "'seed' must be an integer"),
    ("/api/nothing", None, 404, "no endpoint"),
    ("/api/prompt", None, 405, "takes POST"),
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj&idx=%C2%B2", None, 400, "not an integer"),
    ("/api/sample?run=induction&seed=%C2%B2", None, 400, "'seed' must be an integer"),
    ("/api/prompt", {"run": ["induction"], "prompt": "1 S"}, 400, "'run' must be a run folder's name"),
    # bodies Python's json reads only by raising something other than JSONDecodeError
    ("/api/prompt?run=induction", b'{"prompt":' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nests too deeply"),
    ("/api/prompt?run=induction", b'{"prompt": "1 S", "top_k": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    # integers longer than int() reads from text (4300 digits)
    ("/api/sample?run=induction&seed=" + "9" * 5000, None, 400, "'seed' must be an integer"),
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj&idx=" + "9" * 5000, None, 400, "not an integer"),
    ("/api/prompt?run=induction&top_k=" + "9" * 5000, {"prompt": "1 S"}, 400, "'top_k' must be an integer"),
    # only ASCII digits, and the same rule for every integer
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj&idx=%201", None, 400, "not an integer"),
    ("/api/subcomponent?run=induction&site=blocks.0.attn.q_proj&idx=%D9%A1", None, 400, "not an integer"),
    ("/api/sample?run=induction&seed=%203", None, 400, "'seed' must be an integer"),
    ("/api/prompt?run=tms", {"prompt": "1_1"}, 400, "not index:value"),
    ("/api/prompt?run=tms", {"prompt": "\u0661:1"}, 400, "not index:value"),
    ("/api/prompt?run=tms", {"prompt": "0:1_000"}, 400, "not index:value"),
])
def test_api_answers_bad_requests_with_a_clear_4xx(api, path, body, status, phrase):
    got, headers, raw = call(api, path, body)
    assert got == status and headers["Content-Type"] == "application/json"
    assert phrase in json.loads(raw)["error"]
    assert headers["Server-Timing"].startswith("app;dur=")  # also for bodies refused before any endpoint runs
    assert len(raw) < 1000  # a 5000-digit id is not repeated back


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_api_answers_other_methods_with_a_json_405(api, method):
    got, headers, raw = call(api, "/api/prompt?run=induction", {"prompt": "1 S"}, method=method)
    assert got == 405 and headers["Content-Type"] == "application/json" and headers["Allow"] == "POST"
    assert f"takes POST, not {method}" in json.loads(raw)["error"]


def test_api_answers_head_like_get_without_a_body(api):
    host, port = api.removeprefix("http://").split(":")
    answers = {}
    for path in ("/api/run?run=induction", "/", "/api/prompt", "/api/nothing"):
        con = http.client.HTTPConnection(host, int(port), timeout=10)
        con.request("HEAD", path)
        res = con.getresponse()
        answers[path] = (res.status, res.getheader("Content-Type"), int(res.getheader("Content-Length")), res.read(),
                         res.getheader("Server-Timing"), res.getheader("Allow"))
        con.close()
    status, ctype, length, body, timing, _ = answers["/api/run?run=induction"]
    assert (status, ctype, body) == (200, "application/json", b"") and timing.startswith("app;dur=")
    assert length == len(call(api, "/api/run?run=induction")[2])  # GET's length
    assert answers["/"][:2] == (200, "text/html; charset=utf-8") and answers["/"][3] == b""
    assert answers["/api/prompt"][0] == 405 and answers["/api/prompt"][5] == "POST" and answers["/api/prompt"][3] == b""
    assert answers["/api/nothing"][0] == 404


def test_api_answers_malformed_requests_in_json(api):
    import socket

    host, port = api.removeprefix("http://").split(":")
    too_many_headers = b"GET /api/run HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n"
    for request in (b"BREW /api/run HTTP/1.1\r\nHost: x\r\n\r\n", too_many_headers):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head and json.loads(body)["status"] in (431, 501), reply


@pytest.mark.parametrize("headers, status", [
    ({}, 411), ({"Content-Length": str(10**9)}, 413), ({"Content-Length": "9" * 5000}, 413),
    ({"Content-Length": "\u00b2"}, 411), ({"Content-Length": "-1"}, 411),  # '²'.isdigit() is True; int('²') fails
])
def test_api_refuses_bodies_without_length_or_too_large_without_waiting(api, headers, status):
    host, port = api.removeprefix("http://").split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=5)
    con.putrequest("POST", "/api/prompt?run=induction")
    for k, v in headers.items():
        con.putheader(k, v)
    con.endheaders()
    res = con.getresponse()
    assert res.status == status and "error" in json.loads(res.read())
    assert res.getheader("Server-Timing").startswith("app;dur=")
    con.close()


def test_api_refuses_a_body_shorter_than_its_length(api):
    import socket

    host, port = api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        body = b'{"prompt": "1 S"}'
        sock.sendall(b"POST /api/prompt?run=induction HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400"), reply[:80]
    assert b"fewer than its Content-Length 500" in reply


def test_cli_harvest_and_serve_errors(tms_run, tmp_path, capsys):
    from tspd.cli import main

    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    assert main(["harvest", str(run), "--n-examples", "500"]) == 0
    assert "harvested 500 examples" in capsys.readouterr().out and (run / DB_NAME).exists()
    assert RunSession(run).info()["harvest"]["stale"] is False
    st = (run / "decomposition.safetensors").stat()
    os.utime(run / "decomposition.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touch: same bytes
    assert RunSession(run).info()["harvest"]["stale"] is False
    scale_factors(run, 2.0)  # as a re-run would
    assert RunSession(run).info()["harvest"]["stale"] is True
    assert main(["harvest", str(run), "--n-examples", "0"]) == 2
    assert "--n-examples must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "is not a tspd run folder" in capsys.readouterr().err


def test_tspd_serve_prints_the_url_it_answers_on(induction_run):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tspd", "serve", str(induction_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        status, _, body = call(url.rstrip("/"), "/api/runs")
        assert status == 200 and json.loads(body) == {"runs": ["induction"]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_api_turns_nan_in_run_files_into_null(tms_run, tmp_path):
    """A NaN in a run's JSON (Python writes it; a mean over an empty group gives one) must not make
    the API's answer invalid JSON for the browser."""
    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    (run / "results.json").write_text('{"acc": NaN, "nested": [1.0, Infinity]}')
    server = make_server(run, port=0)
    server.start_background()
    try:
        _, _, raw = call(server.url, "/api/tables")
    finally:
        server.shutdown()
        server.server_close()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    tables = json.loads(raw, parse_constant=refuse)  # strict, as a browser's JSON.parse
    assert tables["results"] == {"acc": None, "nested": [1.0, None]}


# ---- run folders that change or are damaged under a running server ---------------------------
@pytest.fixture
def served():
    """Start a server over a path (`served(path)` gives its base URL); all are stopped afterwards."""
    servers = []

    def start(path):
        server = make_server(path, port=0)
        server.start_background()
        servers.append(server)
        return server.url.rstrip("/")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get_json(base, path, body=None):
    status, _, raw = call(base, path, body)
    return status, json.loads(raw)


def test_a_server_serves_the_decomposition_on_disk_and_says_when_its_harvest_is_stale(tms_run, tmp_path, served):
    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    harvest(run, n_examples=200)
    base = served(run)
    sub = "/api/subcomponent?site=linear1&idx=0"
    norm = get_json(base, sub)[1]["norm"]
    assert get_json(base, "/api/run")[1]["harvest"]["stale"] is False
    session = RunSession(run)  # a Python API session keeps the decomposition it loaded
    scale_factors(run, 2.0)  # a re-run replaces the decomposition under the running server
    assert get_json(base, sub)[1]["norm"] == pytest.approx(2 * norm, rel=1e-5)
    assert get_json(base, "/api/run")[1]["harvest"]["stale"] is True
    harvest(run, n_examples=200)
    assert get_json(base, "/api/run")[1]["harvest"]["stale"] is False
    assert get_json(base, sub)[1]["norm"] == pytest.approx(2 * norm, rel=1e-5)
    # The old session's decomposition is not the one harvested now, and it says so.
    assert session.subcomponent("linear1", 0)["norm"] == pytest.approx(norm, rel=1e-5)
    assert session.info()["harvest"]["stale"] is True


def test_a_copied_run_keeps_its_harvest(tms_run, tmp_path):
    run, copy = tmp_path / "tms", tmp_path / "copy"
    shutil.copytree(tms_run, run)
    harvest(run, n_examples=100)
    shutil.copytree(run, copy, copy_function=shutil.copyfile)  # as `cp -r`: the same bytes, new times
    dec = "decomposition.safetensors"
    assert (copy / dec).stat().st_mtime_ns != (run / dec).stat().st_mtime_ns
    assert RunSession(copy).info()["harvest"]["stale"] is False
    # A harvest written before content fingerprints holds "size:mtime_ns", and is judged by them.
    st = (copy / dec).stat()
    for made_from, stale in ((f"{st.st_size}:{st.st_mtime_ns}", False), (f"{st.st_size}:{st.st_mtime_ns + 1}", True)):
        con = sqlite3.connect(copy / DB_NAME)
        con.execute("UPDATE meta SET value = ? WHERE key = 'fingerprint'", (json.dumps(made_from),))
        con.commit()
        con.close()
        assert RunSession(copy).info()["harvest"]["stale"] is stale


def _training_rows(n: int) -> str:
    return "".join(json.dumps({"step": s, "lr": 1e-3, "p": 1.0, "loss": 0.2, "faithfulness": 0.1, "stochastic_recon": 0.01,
                               "stochastic_recon_layerwise": 0.01, "importance_minimality": 0.5,
                               "l0": {"linear1": 0.1, "linear2": 0.3}}) + "\n" for s in range(n))


def test_metrics_of_a_long_log_take_linear_time(tms_run, tmp_path):
    import time

    from tspd.train import metric_records

    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    n = 40_000  # 10 s before, when each row re-made every series' padding
    (run / "metrics.jsonl").write_text(_training_rows(n))
    s = RunSession(run)
    t0 = time.perf_counter()
    metric_records(run / "metrics.jsonl")  # reading the lines: the part that must stay linear anyway
    t1 = time.perf_counter()
    m = s.metrics()
    t2 = time.perf_counter()
    assert len(m["train"]["step"]) == n and len(m["train"]["losses"]) == 5
    assert all(len(v) == n for v in [*m["train"]["losses"].values(), *m["train"]["l0"].values()])
    # Measured against reading the file on the same (possibly busy) machine, so the bound holds under load.
    assert t2 - t1 < 3 * (t1 - t0) + 1.0, f"metrics() of {n} rows took {t2 - t1:.1f} s, reading them {t1 - t0:.1f} s"


def test_metrics_pad_every_series_and_skip_lines_of_another_shape(tms_run, tmp_path, served):
    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    rows = [
        {"step": 0, "lr": 1e-3, "p": 1.0, "loss": 0.5, "l0": {"linear1": 1.0}},
        {"step": 1, "eval": {"alive": {"linear1": 3}, "l0": {"linear1": 0.5}, "ones_recon": 0.1}},
        {"step": 2, "eval": 5},  # not an evaluation
        {"step": 2, "loss": 0.4, "extra": 1.0, "lr": "fast", "l0": 7},  # lr and l0 of another shape
        {"eval": {"alive": {"linear1": 1}}},  # no step
        {"step": "3", "loss": 1.0},
        {"step": 3, "eval": {"alive": {"linear1": 4, "linear2": 9}, "ones_recon": 0.2, "ci_masked_recon": 0.3, "l0": [1]}},
        ["not", "a", "record"],
        {"step": 4, "consolidate": {"linear1": [[0, 1]]}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    status, m = get_json(served(run), "/api/metrics")
    assert status == 200, m
    assert m["train"] == {"step": [0, 2], "lr": [1e-3, None], "p": [1.0, None],
                          "losses": {"loss": [0.5, 0.4], "extra": [None, 1.0]}, "l0": {"linear1": [1.0, None]}}
    # An evaluation series that first appears at a later evaluation is None before it, not shifted.
    assert m["eval"] == {"step": [1, 3], "alive": {"linear1": [3, 4], "linear2": [None, 9]}, "l0": {"linear1": [0.5, None]},
                         "recon": {"ones_recon": [0.1, 0.2], "ci_masked_recon": [None, 0.3]}}


def _damage_harvest(path, how: str) -> None:
    if how == "not a database":
        path.write_bytes(b"this is not an SQLite file " * 100)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        con = sqlite3.connect(path)
        con.execute("DROP TABLE contexts" if how == "no contexts table" else "UPDATE meta SET value = '{' WHERE key = 'n_examples'")
        con.commit()
        con.close()


@pytest.mark.parametrize("how, list_status, detail_status", [
    ("not a database", 422, 422), ("empty", 422, 422), ("no contexts table", 200, 422), ("meta not JSON", 200, 200),
])
def test_a_damaged_harvest_is_a_422_that_says_to_harvest_again(induction_run, tmp_path, served, how, list_status,
                                                                detail_status):
    run = tmp_path / "induction"
    shutil.copytree(induction_run, run)
    _damage_harvest(run / DB_NAME, how)
    base = served(run)
    status, info = get_json(base, "/api/run")  # the run still opens; the harvest is reported damaged
    assert status == 200 and "is damaged" in info["harvest"]["error"] and f"tspd harvest {run}" in info["harvest"]["error"]
    for path, expected in (("/api/subcomponent?site=blocks.0.attn.q_proj&idx=0", detail_status),
                           ("/api/subcomponents?site=blocks.0.attn.q_proj", list_status)):
        status, answer = get_json(base, path)
        assert status == expected, answer
        if status == 422:
            assert "is damaged" in answer["error"] and f"tspd harvest {run}" in answer["error"], answer
    assert get_json(base, "/api/prompt", {"prompt": "1 S"})[0] == 200  # what needs no harvest still works


def test_a_damaged_analysis_file_is_a_422_naming_it(tms_run, tmp_path, served):
    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    good = (run / "eval.json").read_text()
    (run / "eval.json").write_text(good[: len(good) // 2])  # cut short
    base = served(run)
    status, answer = get_json(base, "/api/tables")
    assert status == 422 and f"{run / 'eval.json'} is damaged" in answer["error"] and "move it away" in answer["error"]
    (run / "eval.json").write_text(good)
    (run / "census.json").write_bytes(b"\xff\xfe{")
    status, answer = get_json(base, "/api/tables")
    assert status == 422 and f"`tspd census {run}`" in answer["error"]
    (run / "census.json").unlink()
    assert get_json(base, "/api/tables")[1]["eval"] == json.loads(good)


def test_the_runs_list_follows_the_folder(tms_run, tmp_path, served):
    root = tmp_path / "runs"
    shutil.copytree(tms_run, root / "a")
    base = served(root)
    assert get_json(base, "/api/runs")[1] == {"runs": ["a"]}
    assert call(base, "/api/run?run=a")[0] == 200
    shutil.copytree(tms_run, root / "b")
    assert get_json(base, "/api/runs")[1] == {"runs": ["a", "b"]}
    shutil.rmtree(root / "a")
    assert get_json(base, "/api/runs")[1] == {"runs": ["b"]}
    status, answer = get_json(base, "/api/run?run=a")
    assert status == 404 and "no run folder 'a'" in answer["error"]
    assert call(base, "/api/run")[0] == 200  # the one run left needs no name


def test_the_server_queues_a_burst_of_connections(tms_run):
    import socket

    server = make_server(tms_run, port=0)  # not serving yet: every connection waits in the listen queue
    host, port = server.server_address[:2]
    socks = []
    try:
        for _ in range(40):
            socks.append(socket.create_connection((host, port), timeout=0.5))
    except OSError:
        pass  # a full queue drops the connection: here, a time-out
    finally:
        for sock in socks:
            sock.close()
        server.server_close()
    assert len(socks) == 40


def test_cli_harvest_of_a_damaged_decomposition_is_a_clean_error(tms_run, tmp_path, capsys, monkeypatch):
    from tspd.cli import main

    monkeypatch.delenv("TSPD_TRACEBACK", raising=False)
    run = tmp_path / "tms"
    shutil.copytree(tms_run, run)
    dec = run / "decomposition.safetensors"
    dec.write_bytes(dec.read_bytes()[:100])  # cut short
    assert main(["harvest", str(run)]) == 2
    err = capsys.readouterr().err
    # (the message names the run folder or its decomposition file, and the safetensors reader's complaint)
    assert err.startswith("tspd: error: ") and str(run) in err and "SafetensorError" in err, err
    assert "Traceback" not in err and not (run / DB_NAME).exists()
