"""The induction task's data generator and the toy target's forward (SPEC §6.1)."""

import pytest
import torch

from tspd.data.induction import ROLES, InductionData, InductionTask
from tspd.seeding import generator
from tspd.targets.induction import InductionTransformer, phase_change_step


def test_sequences_have_the_induction_structure():
    task = InductionTask(n_tokens=20, seq_len=16)
    tokens, labels, first_s = task.sample(500, generator(0, 1))
    assert tokens.shape == (500, 16)
    assert (tokens[:, 0] == task.bos).all()
    assert (tokens[:, -1] == task.special).all()
    rows = torch.arange(500)
    assert (tokens[rows, first_s] == task.special).all()
    assert ((first_s >= 1) & (first_s <= 16 - 3)).all()
    # exactly two S per sequence, and the label is the token after the first S
    assert ((tokens == task.special).sum(1) == 2).all()
    assert torch.equal(labels, tokens[rows, first_s + 1])
    assert (labels < task.n_tokens).all()
    # the first S position is spread over its whole range
    assert set(first_s.tolist()) == set(range(1, 14))


def test_roles_mark_first_s_m_and_final_s():
    task = InductionTask(n_tokens=20, seq_len=8)
    roles = task.roles(torch.tensor([1, 5]))
    other = ROLES.index("other")
    assert roles[0].tolist() == [other, 0, 1, other, other, other, other, 2]
    assert roles[1].tolist() == [other, other, other, other, other, 0, 1, 2]


def test_data_source_is_deterministic_in_step():
    data = InductionData(InductionTask(n_tokens=20, seq_len=16), batch_size=4, seed=3)
    assert torch.equal(data(7), data(7))
    assert not torch.equal(data(7), data(8))


def test_positions_enter_queries_and_keys_only():
    """The residual stream carries no position: with attention zeroed out, the logits at every
    position depend on that position's token alone."""
    model = InductionTransformer(vocab_size=22, d_model=16, seq_len=16)
    tokens = torch.tensor([[20, 3, 3, 3, 7, 3]])
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
        logits = model(tokens)
    assert torch.allclose(logits[0, 1], logits[0, 2]) and torch.allclose(logits[0, 1], logits[0, 5])
    assert not torch.allclose(logits[0, 1], logits[0, 4])


def _hand_built_circuit(task: InductionTask) -> InductionTransformer:
    """Weights set by hand to the 2-step circuit."""
    V, d, T = task.vocab_size, 16, task.seq_len
    model = InductionTransformer(vocab_size=V, d_model=d, seq_len=T)
    big = 30.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # dims 0..7: token identity; dims 8..15: previous token's identity (written by layer 0)
        model.embed.weight[:V, :V] = torch.eye(V)
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        # layer 0: position n attends to n-1 through the positions alone: P[n] = e_{8 + n mod 8}
        # (dims 8+ are empty in the embedding), q reads it as e_{n mod 8}, k as e_{(n+1) mod 8}.
        for n in range(T):
            a0.pos[n, 8 + n % 8] = 1.0
        for j in range(8):
            a0.q_proj.weight[j, 8 + j] = big
            a0.k_proj.weight[(j + 1) % 8, 8 + j] = 1.0
        # copies the attended token's identity to dims 8+
        a0.v_proj.weight[:V, :V] = torch.eye(V)
        a0.o_proj.weight[8 : 8 + V, :V] = torch.eye(V)
        # layer 1: query = current token, key = previous token; copies the attended token
        a1.q_proj.weight[:V, :V] = big * torch.eye(V)
        a1.k_proj.weight[:V, 8 : 8 + V] = torch.eye(V)
        a1.v_proj.weight[:V, :V] = torch.eye(V)
        a1.o_proj.weight[:V, :V] = 10 * torch.eye(V)
        model.unembed.weight[:V, :V] = torch.eye(V)
    return model


@pytest.mark.parametrize("T", [1, 5, 64])
def test_attention_matches_torchs_causal_sdpa(T):
    """The layer's baddbmm + softmax attention against torch's fused causal attention, and the
    recorded pattern is causal with rows summing to 1."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    attn = InductionTransformer(20, 16, 2, 64).blocks[0].attn
    x = torch.randn(3, T, 16)
    xp = x + attn.pos[:T]
    q, k, v = attn.q_proj(xp), attn.k_proj(xp), attn.v_proj(x)
    ref = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True).squeeze(1)
    torch.testing.assert_close(attn(x), attn.o_proj(ref), rtol=1e-5, atol=1e-6)
    attn.record_pattern = True
    attn(x)
    p = attn.last_pattern
    assert torch.all(p.triu(1) == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, T))


def test_hand_built_previous_token_and_copy_heads_solve_the_task():
    """Set the weights by hand to the 2-step circuit and check the forward predicts M."""
    task = InductionTask(n_tokens=6, seq_len=10)
    model = _hand_built_circuit(task)
    tokens, labels, _ = task.sample(200, generator(0, 2))
    acc = (model(tokens)[:, -1].argmax(-1) == labels).float().mean()
    assert acc > 0.8, float(acc)


def test_circuit_only_check_keeps_a_hand_built_circuit_and_breaks_a_random_model():
    """Restricting Q/K/V to their roles keeps the hand-built circuit's answers (it uses nothing
    else) but changes a random model's output; the hooks are gone afterwards."""
    from tspd.analysis.induction import CIRCUIT_VARIANTS, circuit_only_check

    task = InductionTask(n_tokens=6, seq_len=10)
    model = _hand_built_circuit(task)
    res = circuit_only_check(model, task, n_sequences=300)
    assert set(res) == {"target_accuracy", *CIRCUIT_VARIANTS}
    assert res["target_accuracy"] > 0.8 and res["circuit"]["accuracy"] >= res["target_accuracy"] - 0.05
    torch.manual_seed(0)
    rand = InductionTransformer(vocab_size=task.vocab_size, d_model=16, seq_len=task.seq_len)
    tokens, _, _ = task.sample(4, generator(0, 3))
    before = rand(tokens)
    res = circuit_only_check(rand, task, n_sequences=300)
    assert res["circuit"]["kl"] > 1e-4 and all(res[v]["kl"] >= 0 for v in CIRCUIT_VARIANTS)
    torch.testing.assert_close(rand(tokens), before)


def test_phase_change_step_finds_the_sharpest_drop():
    history = [{"step": s, "loss": l} for s, l in [(100, 4.0), (200, 3.9), (300, 3.8), (400, 0.5), (500, 0.1)]]
    assert phase_change_step(history) == 400


def test_train_target_writes_history_and_curve_and_refuses_an_untrained_target(tmp_path):
    """200 steps are far too few for the induction phase change: the command must say so, and
    still leave the loss history and curve for inspection."""
    import json

    import pytest

    from tspd.experiments import train_target

    with pytest.raises(RuntimeError, match="max_steps"):
        train_target("induction", tmp_path, overrides=["max_steps=200", "seq_len=16", "batch_size=32"])
    summary = json.loads((tmp_path / "target_history.json").read_text())
    assert [h["step"] for h in summary["history"]] == [50, 100, 150, 200]
    assert summary["final"]["accuracy"] < 0.99
    assert (tmp_path / "target_loss_curve.png").stat().st_size > 1000


def test_shipped_targets_solve_the_task_and_match_the_default_settings():
    """The demo's targets: every shipped seed predicts M on >= 99 % of fresh sequences, and the
    recipe's default target settings (seeds 0, 1, 2) select them."""
    from safetensors.torch import load_file

    from tspd.config import RunConfig
    from tspd.experiments import shipped_target

    from tspd.cli import CONFIGS_DIR

    cfg = RunConfig.from_yaml(CONFIGS_DIR / "induction.yaml")
    task = InductionTask(cfg.target.n_tokens, cfg.target.seq_len)
    tokens, labels, _ = task.sample(1000, generator(123, 4, 5))
    for seed in (0, 1, 2):
        folder = shipped_target(cfg.target.model_copy(update={"seed": seed}))
        assert folder is not None and folder.name == f"induction-seed{seed}"
        model = InductionTransformer(task.vocab_size, cfg.target.d_model, 2, task.seq_len)
        model.load_state_dict(load_file(folder / "target.safetensors"))
        with torch.no_grad():
            acc = (model(tokens)[:, -1].argmax(-1) == labels).float().mean()
        assert acc >= 0.99, (seed, float(acc))
    assert shipped_target(cfg.target.model_copy(update={"seed": 17})) is None
    assert shipped_target(cfg.target.model_copy(update={"lr": 1e-3})) is None


@pytest.mark.slow
def test_train_target_reproduces_the_shipped_target(tmp_path):
    """`tspd train-target induction --seed 0` gives the shipped weights (same torch, same CPU kind)."""
    from safetensors.torch import load_file

    from tspd.experiments import ASSETS_DIR, train_target

    path = train_target("induction", tmp_path, seed=0)
    new, shipped = load_file(path), load_file(ASSETS_DIR / "induction-seed0" / "target.safetensors")
    assert new.keys() == shipped.keys()
    for k in new:
        torch.testing.assert_close(new[k], shipped[k], rtol=1e-4, atol=1e-5)
