"""Consolidation (tspd.consolidate): merging co-active subcomponents keeps V U and the outputs."""

from __future__ import annotations

import json

import pytest
import torch

import tspd
from conftest import make_cfg, set_exact_factors
from test_train import _metric_lines
from tspd.consolidate import Merge, Pruned, SwitchedOff, co_active_groups, consolidate, output_errors, split_group
from tspd.train import CHECKPOINT


def test_groups_follow_nested_activity():
    # piece 0: rows 0-5; piece 2: rows 0-3 (inside 0's); piece 1: rows 4-9 (half outside); piece 3: never
    a = torch.zeros(10, 4, dtype=torch.bool)
    a[0:6, 0] = True
    a[0:4, 2] = True
    a[4:10, 1] = True
    assert co_active_groups(a, 0.9) == [[0, 2], [1]]
    assert co_active_groups(a, 0.3) == [[0, 1, 2]]


def test_split_group_on_one_input_needs_one_piece():
    g = torch.Generator().manual_seed(0)
    V, U = torch.randn(8, 5, generator=g), torch.randn(5, 6, generator=g)
    x = torch.randn(1, 8, generator=g).repeat(7, 1)  # the group only ever sees one input
    V2, U2, r, resid = split_group(V, U, x, tol=0.01)
    assert r == 1 and resid < 1e-6
    torch.testing.assert_close(V2 @ U2, V @ U, atol=1e-5, rtol=1e-5)
    # the first piece alone gives the group's output on that input; the others give ~0 there
    torch.testing.assert_close(x @ V2[:, :1] @ U2[:1], x @ V @ U, atol=1e-4, rtol=1e-4)
    assert float((x[:1] @ V2[:, 1:] @ U2[1:]).norm()) < 1e-4
    # balanced norms for the active piece
    assert abs(float(V2[:, 0].norm()) - float(U2[0].norm())) < 1e-4


def test_split_group_keeps_full_rank_groups():
    g = torch.Generator().manual_seed(1)
    V, U = torch.randn(8, 3, generator=g), torch.randn(3, 6, generator=g)
    x = torch.randn(50, 8, generator=g)  # varied inputs: the 3 pieces span 3 output directions
    assert split_group(V, U, x, tol=0.01) is None


def _merge_target():
    """A TwoLayer whose linear1 input is always the same vector (so its active pieces can merge)."""
    from conftest import TwoLayer

    torch.manual_seed(0)
    return TwoLayer(6, 4, 6)


def test_consolidate_keeps_weights_and_merges(monkeypatch):
    cfg = make_cfg([("linear1", 6), ("linear2", 6)], eval={"active_threshold": 0.5})
    dec = tspd.Decomposition(_merge_target(), cfg)
    before = {s: dec.component(s).weight().clone() for s in dec.site_names}
    x = torch.randn(1, 6).repeat(16, 1)
    # Every piece of linear1 fully on for every input: one co-active group of 6 on a single input.
    ones = {s: torch.full((16, 6), 9.0) for s in dec.site_names}
    monkeypatch.setattr(dec, "ci_logits", lambda inputs, keep=None: ones)
    merges = consolidate(dec, [x], tol=0.01, overlap=0.9)
    assert {m.site for m in merges} == {"linear1", "linear2"}
    m1 = next(m for m in merges if m.site == "linear1")
    assert m1.rank == 1 and sorted(m1.slots) == list(range(6))
    for s in dec.site_names:
        torch.testing.assert_close(dec.component(s).weight(), before[s], atol=1e-5, rtol=1e-5)
    # on that input, linear1's first slot alone reproduces the whole site's output
    c = dec.component("linear1")
    lead = m1.slots[0]
    torch.testing.assert_close(x @ c.V[:, lead : lead + 1] @ c.U[lead : lead + 1], x @ c.V @ c.U, atol=1e-4, rtol=1e-4)


def _const_data(step):
    """One fixed input repeated: every co-active group there can shrink to one piece."""
    return torch.randn(1, 6, generator=torch.Generator().manual_seed(7)).repeat(16, 1)


def test_consolidate_in_training_logs_resumes_and_keeps_faithfulness(tmp_path):
    from conftest import TwoLayer

    cfg = make_cfg(
        [("linear1", 8), ("linear2", 8)], seed=1,
        losses={"faithfulness": 1.0, "stochastic_recon": 1.0, "importance_minimality": 0.0},
        output={"divergence": "mse"}, eval={"active_threshold": 0.2}, consolidate={"at_frac": [0.5, 0.75], "tol": 0.05},
        train={"steps": 20, "batch_size": 16, "lr": 1e-2, "faithfulness_warmup_steps": 20, "log_every": 1,
               "eval_every": 10, "eval_batches": 1, "checkpoint_every": 5},
    )

    def target():
        torch.manual_seed(0)
        return TwoLayer(6, 4, 6)

    full = tspd.decompose(target(), _const_data, cfg, run_dir=tmp_path / "full", progress=False)
    rows = [r for r in _metric_lines(tmp_path / "full") if "consolidate" in r]
    assert [r["step"] for r in rows] == [10, 15]
    merges = [m for r in rows for m in r["consolidate"]]
    assert merges and all(m["rank"] == 1 < len(m["slots"]) and m["residual"] <= 0.05 for m in merges)
    # killed between the merges, resumed: identical to the uninterrupted run
    part = tmp_path / "part"
    tspd.decompose(target(), _const_data, cfg, run_dir=part, progress=False, stop_after=12)
    assert torch.load(part / CHECKPOINT, weights_only=False)["step"] == 12
    resumed = tspd.decompose(target(), _const_data, cfg, run_dir=part, progress=False, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert _metric_lines(part) == _metric_lines(tmp_path / "full")


def test_consolidate_batches_are_held_out_steps_of_the_source(monkeypatch):
    import tspd.consolidate as cons
    from conftest import TwoLayer

    seen = []
    monkeypatch.setattr(cons, "consolidate", lambda dec, batches, *a, **k: seen.append(batches) or [])
    cfg = make_cfg(
        [("linear1", 4)], consolidate={"at_frac": [0.5], "batches": 3},
        train={"steps": 4, "batch_size": 2, "eval_batches": 1, "faithfulness_warmup_steps": 0},
    )
    torch.manual_seed(0)
    tspd.decompose(TwoLayer(6, 4, 6), lambda step: torch.full((2, 6), float(step)), cfg, progress=False)
    assert [[float(b[0, 0]) for b in bs] for bs in seen] == [[-1.0, -2.0, -3.0]]


def test_consolidate_fractions_map_to_steps():
    with pytest.raises(ValueError, match="consolidate.at_frac"):
        make_cfg([("linear1", 4)], consolidate={"at_frac": [1.5]})
    assert make_cfg([("linear1", 4)], consolidate={"at_frac": [1.0]}).consolidate.steps(50) == {50}  # after the last
    cfg = make_cfg([("linear1", 4)], train={"steps": 3000}, consolidate={"at_frac": [0.6, 0.8]})
    assert cfg.consolidate.steps(3000) == {1800, 2400}
    assert cfg.consolidate.steps(4) == {2, 3} and cfg.consolidate.steps(1) == {1}
    assert json.loads(cfg.model_dump_json())["consolidate"]["at_frac"] == [0.6, 0.8]


def test_merge_keeps_the_sign_and_scale_of_inner_activations_an_mlp_ci_reads():
    """The mlp CI reads x v: a merged active piece keeps the sign and RMS of x v that the old piece
    in its slot had on the group's inputs (the SVD's sign is arbitrary), with V U unchanged; and the
    final round never switches a merged piece off for good."""
    from conftest import TwoLayer

    for seed in range(6):
        torch.manual_seed(seed)
        dec = tspd.Decomposition(TwoLayer(6, 4, 6), make_cfg([("linear1", 6)], ci={"kind": "mlp", "hidden": [4]}))
        with torch.no_grad():
            bias = dec.ci_fns["linear1"].output_bias()
            bias[:3] += 10.0  # slots 0-2 co-active everywhere, 3-5 off
            bias[3:] -= 10.0
        x = torch.randn(1, 6).repeat(8, 1)
        comp = dec.component("linear1")
        before_h, before_w = (x @ comp.V).detach().clone(), comp.weight().detach().clone()
        changes = consolidate(dec, [x], tol=0.01, final=True)
        (m,) = [c for c in changes if isinstance(c, Merge)]
        assert m.rank == 1
        top, old_top = m.slots[0], m.slots[0]
        h = (x @ comp.V).detach()
        assert float((h[:, top] * before_h[:, old_top]).sum()) > 0, seed
        torch.testing.assert_close(h[:, top].pow(2).mean().sqrt(), before_h[:, old_top].pow(2).mean().sqrt())
        torch.testing.assert_close(comp.weight().detach(), before_w, rtol=1e-4, atol=1e-5)
        off = [c for c in changes if isinstance(c, SwitchedOff)]
        assert all(top not in c.slots for c in off if c.site == "linear1"), seed


def test_merge_restarts_the_rewritten_pieces_adam_moments_at_the_tensors_scale():
    """First moment 0; second moment the mean of the untouched entries (zeroing it too, under a bias
    correction near 1, made the rewritten pieces' steps several times lr)."""
    from conftest import TwoLayer

    from tspd import distributed
    from tspd.losses import compute_losses
    from tspd.train import DataStream, _consolidate, make_optimizer, optimizer_step

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"},
                   consolidate={"at_frac": [0.5], "tol": 0.01, "batches": 1}, train={"eval_batches": 1})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    with torch.no_grad():
        bias = dec.ci_fns["linear1"].output_bias()
        bias[:3] += 10.0  # slots 0-2 on everywhere (co-active), 3-5 off
        bias[3:] -= 10.0
    x = torch.randn(1, 6).repeat(8, 1)
    opt = make_optimizer(dec)
    for i in range(3):
        total, _, _ = compute_losses(dec, x, i, torch.Generator().manual_seed(i))
        optimizer_step(dec, opt, total)
    V, U = dec.component("linear1").V, dec.component("linear1").U
    before = {p: opt.state[p]["exp_avg_sq"].clone() for p in (V, U)}
    merges = _consolidate(dec, opt, DataStream(lambda step: x, 1), torch.device("cpu"), distributed.world())
    slots = [m for m in merges if "slots" in m][0]["slots"]
    assert sorted(slots) == [0, 1, 2]
    for p, cols in ((V, True), (U, False)):
        st = opt.state[p]
        m1, m2, old = (t if cols else t.T for t in (st["exp_avg"], st["exp_avg_sq"], before[p]))
        assert float(m1[:, slots].abs().sum()) == 0
        expected = old[:, [3, 4, 5]].mean(1, keepdim=True).expand(-1, 3)
        torch.testing.assert_close(m2[:, slots], expected)
        torch.testing.assert_close(m2[:, [3, 4, 5]], old[:, [3, 4, 5]])  # untouched pieces keep theirs


@pytest.mark.parametrize("kind", ["vector_mlp", "shared_mlp", "mlp"])
def test_merged_away_slots_start_switched_off(kind):
    from conftest import TwoLayer

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": kind, "hidden": [4]})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    fn = dec.ci_fns["linear1"]
    with torch.no_grad():
        fn.output_bias().add_(10.0)  # every slot on everywhere
    x = torch.randn(1, 6).repeat(8, 1)
    assert bool((dec.causal_importance(x)["linear1"] == 1).all())
    (m,) = consolidate(dec, [x], tol=0.01)
    ci = dec.causal_importance(x)["linear1"]
    assert m.rank == 1
    assert bool((ci[:, m.slots[0]] == 1).all()) and bool((ci[:, m.slots[1:]] == 0).all())


def test_functional_rank_accepts_free_merges_and_reverts_costly_ones():
    from conftest import TwoLayer

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    set_exact_factors(dec, "linear1")
    with torch.no_grad():
        dec.ci_fns["linear1"].output_bias().add_(10.0)
    const = torch.randn(1, 6).repeat(8, 1)
    (m,) = consolidate(dec, [const], max_increase=1e-6)  # one input: rank 1 costs nothing
    assert m.rank == 1

    # A plain linear map on varied inputs uses all 4 output directions: no rank below 4 is free
    # (the 2 zero pieces of the exact 6-piece factorisation may fold into the remainder).
    lin_cfg = make_cfg([("0", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"})
    dec = tspd.Decomposition(torch.nn.Sequential(torch.nn.Linear(6, 4)), lin_cfg)
    set_exact_factors(dec, "0")
    with torch.no_grad():
        dec.ci_fns["0"].output_bias().add_(10.0)
    w0 = dec.component("0").weight().clone()
    merges = consolidate(dec, [torch.randn(64, 6)], max_increase=1e-6)
    assert all(m.rank == 4 for m in merges)
    torch.testing.assert_close(dec.component("0").weight(), w0, atol=1e-5, rtol=1e-5)


def test_a_rarely_active_member_keeps_its_direction():
    # 97 inputs x0 and 3 inputs x1: piece 0 active everywhere, piece 1 only on x1. Its output
    # direction is a tiny share of the group's total but all of its own inputs' output.
    g = torch.Generator().manual_seed(3)
    V, U = torch.randn(8, 2, generator=g), torch.randn(2, 5, generator=g)
    x0, x1 = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    x = torch.cat([x0.repeat(97, 1), x1.repeat(3, 1)])
    members = torch.zeros(100, 2, dtype=torch.bool)
    members[:, 0] = True
    members[97:, 1] = True
    b, err = output_errors(V, U, x, members)
    assert float(err[0]) > 0.05  # one direction leaves x1's output wrong


def _on_at_a_and_2a(monkeypatch):
    """linear1 factored exactly; inputs a and 2a; CI: piece 0 on at both, piece 1 at 2a only."""
    from conftest import TwoLayer

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    set_exact_factors(dec, "linear1")
    a = torch.randn(1, 6)
    ci = torch.zeros(2, 6)
    ci[:, 0], ci[1, 1] = 1.0, 1.0
    real = dec.ci_from_logits
    monkeypatch.setattr(dec, "ci_from_logits", lambda z: ({"linear1": ci.clone()}, real(z)[1]))
    return dec, torch.cat([a, 2 * a])


def test_functional_rank_counts_the_rotation_not_the_union_of_the_members_activity(monkeypatch):
    """Piece 0 is on at inputs a and b = 2a, piece 1 at b only. Merged, one piece must be on at both,
    which changes the output at a whatever the rotation; the merge is judged against that union
    (members all on wherever any is), so an exact rank-1 merge is accepted."""
    dec, x = _on_at_a_and_2a(monkeypatch)
    (m,) = consolidate(dec, [x], max_increase=1e-9)
    assert m.rank == 1 and sorted(m.slots) == [0, 1] and m.residual < 1e-6


def test_prune_switches_off_free_pieces_and_keeps_needed_ones(monkeypatch):
    """linear1 (6 -> 4) factored exactly: SVD pieces 0-3 carry W, pieces 4, 5 have V = 0. Pieces
    3, 4, 5 are quiet (CI 0.3, never active): together they cost output (piece 3 carries W), so
    they are tried one by one, and only the empty pieces 4, 5 go."""
    from conftest import TwoLayer

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"},
                   eval={"active_threshold": 0.5})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    set_exact_factors(dec, "linear1")
    x = torch.randn(64, 6)
    ci = torch.full((64, 6), 0.3)
    ci[:, :3] = 1.0
    w0 = dec.component("linear1").weight().clone()
    real = dec.ci_from_logits
    monkeypatch.setattr(dec, "ci_from_logits", lambda z: ({"linear1": ci.clone()}, real(z)[1]))
    out = consolidate(dec, [x], tol=0.01, overlap=1.0, prune=1e-6)
    monkeypatch.undo()
    pruned = sorted(j for p in out if isinstance(p, Pruned) for j in p.slots)
    assert pruned == [4, 5]
    assert bool((dec.causal_importance(x)["linear1"][:, 4:] == 0).all())  # their CI function now says off
    torch.testing.assert_close(dec.component("linear1").weight(), w0)  # pruning never touches V, U
    assert all(p.increase <= 1e-6 for p in out if isinstance(p, Pruned))


def test_prune_tries_rarely_active_pieces_alone(monkeypatch):
    """Piece 5 is on (CI 1) on a few inputs where it carries output: pruning it costs more than
    the budget, so it stays; the quiet pieces (CI in (0, 0.5]) that carry nothing go."""
    from conftest import TwoLayer

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"},
                   eval={"active_threshold": 0.5})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    set_exact_factors(dec, "linear1")
    with torch.no_grad():  # piece 5 gets a real output direction, piece 0 loses its share of W to it
        comp = dec.component("linear1")
        comp.V[:, 5] = comp.V[:, 0] * 0.5
        comp.U[5] = comp.U[0]
        comp.V[:, 0] *= 0.5
    x = torch.randn(40, 6)
    ci = torch.zeros(40, 6)
    ci[3:, :4] = 1.0
    ci[:, 4] = 0.3  # quiet: V = 0, carries nothing
    ci[:3, 5] = 1.0  # rarely active (alone), needed on those inputs
    real = dec.ci_from_logits
    monkeypatch.setattr(dec, "ci_from_logits", lambda z: ({"linear1": ci.clone()}, real(z)[1]))
    out = consolidate(dec, [x], tol=0.01, overlap=1.0, prune=1e-6)
    pruned = sorted(j for p in out if isinstance(p, Pruned) for j in p.slots)
    assert pruned == [4]


def test_final_consolidation_runs_after_the_last_step(tmp_path):
    from conftest import TwoLayer

    cfg = make_cfg(
        [("linear1", 6)], train={"steps": 6, "checkpoint_every": 3}, output={"divergence": "mse"},
        consolidate={"at_frac": [1.0], "prune": 1e-3, "max_increase": 1e-3},
    )
    torch.manual_seed(0)
    tspd.decompose(TwoLayer(6, 4, 6), lambda step: torch.randn(8, 6), cfg, run_dir=tmp_path, progress=False)
    rows = [r for r in _metric_lines(tmp_path) if "consolidate" in r]
    assert [r["step"] for r in rows] == [6]
    # resuming the finished run redoes that same merge once, not twice
    tspd.decompose(TwoLayer(6, 4, 6), lambda step: torch.randn(8, 6), cfg, run_dir=tmp_path, resume=True, progress=False)
    rows = [r for r in _metric_lines(tmp_path) if "consolidate" in r]
    assert [r["step"] for r in rows] == [6]


@pytest.mark.parametrize("final", [True, False])
def test_final_consolidation_switches_quiet_pieces_off_for_good(final):
    """linear1 factored exactly (pieces 0-3 carry W, 4 and 5 have V = 0). Slot 5's CI is 0 on every
    input the consolidation sees, but only just (logit -0.1 at most), so it fires on unseen,
    larger inputs; slot 4 is far off. The last consolidation (final=True) lowers both biases by
    FINAL_MARGIN, and slot 5 stays off everywhere; the pieces in use keep their CI. Intermediate
    ones (final=False, training follows) leave them as they were."""
    from conftest import TwoLayer
    from tspd.consolidate import FINAL_MARGIN, SwitchedOff

    torch.manual_seed(0)
    cfg = make_cfg([("linear1", 6)], ci={"kind": "vector_mlp", "hidden": [4]})
    dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
    set_exact_factors(dec, "linear1")
    x, unseen = torch.randn(32, 6), 20 * torch.randn(2000, 6)
    bias = dec.ci_fns["linear1"].output_bias()
    with torch.no_grad():
        bias[:4] += 10.0  # slots 0-3 on everywhere
        bias[4] -= 10.0
        bias[5] -= float(dec.ci_logits(dec.run_target(x)[1])["linear1"][:, 5].max()) + 0.1
    assert bool((dec.causal_importance(x)["linear1"][:, 5] == 0).all())
    assert bool((dec.causal_importance(unseen)["linear1"][:, 5] > 0.5).any())  # the premise: it can fire
    b5, others = float(bias[5]), dec.causal_importance(unseen)["linear1"][:, :4].clone()
    out = consolidate(dec, [x], tol=1e-12, final=final)  # tol 1e-12: no group merges
    off = [m for m in out if isinstance(m, SwitchedOff)]
    if final:
        assert [m.to_dict() for m in off] == [{"site": "linear1", "off_for_good": [4, 5]}]
        assert float(bias[5]) == pytest.approx(b5 - FINAL_MARGIN)
        assert bool((dec.causal_importance(unseen)["linear1"][:, 5] == 0).all())
    else:
        assert off == [] and float(bias[5]) == b5
    torch.testing.assert_close(dec.causal_importance(unseen)["linear1"][:, :4], others)


@pytest.mark.parametrize("final", [False, True])
def test_final_merges_must_hold_with_the_ci_function_as_it_is(monkeypatch, final):
    """A linear site factored exactly; inputs a, 2a, 10a along pieces 0 and 1's input directions.
    Piece 0 is on at a and 2a, piece 1 at 2a and 10a. Merged to rank 1, the kept piece (0) must be
    on at all three: judged against that union the merge is free, and between rounds training can
    make the kept piece fire there. In the final round nothing follows, so the merge is judged with
    the CI function as it is (the kept piece off at 10a, where piece 1's output was kept): too
    costly, undone."""
    torch.manual_seed(0)
    cfg = make_cfg([("0", 6)], ci={"kind": "vector_mlp", "hidden": [4]}, output={"divergence": "mse"})
    dec = tspd.Decomposition(torch.nn.Sequential(torch.nn.Linear(6, 4)), cfg)
    set_exact_factors(dec, "0")
    comp = dec.component("0")
    a = (comp.V[:, 0] / comp.V[:, 0].norm() + comp.V[:, 1] / comp.V[:, 1].norm()).detach()[None]
    ci = torch.zeros(3, 6)
    ci[:2, 0], ci[1:, 1] = 1.0, 1.0
    real = dec.ci_from_logits
    monkeypatch.setattr(dec, "ci_from_logits", lambda z: ({"0": ci.clone()}, real(z)[1]))
    w0, V0 = comp.weight().clone(), comp.V.clone()
    merges = [m for m in consolidate(dec, [torch.cat([a, 2 * a, 10 * a])], overlap=0.5, max_increase=1e-9, final=final)
              if isinstance(m, Merge)]
    if final:
        assert merges == [] and torch.equal(comp.V, V0)
    else:
        assert len(merges) == 1 and merges[0].rank == 1 and sorted(merges[0].slots) == [0, 1]
    torch.testing.assert_close(comp.weight(), w0, atol=1e-5, rtol=1e-5)
