"""Shared tiny models and helpers for the tspd test suite (CPU, seconds, not minutes)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import tspd

# One thread: every model here is tiny, and with two threads each small matmul waits on an OpenMP
# barrier (milliseconds per op when the other core is busy).
torch.set_num_threads(1)

# torch.compile on CPU writes and builds C++.
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


@pytest.fixture(autouse=True)
def _streams_from_the_environment():
    """A resumed run pins its checkpoint's stream mixer for the rest of the process (the CLI's
    analysis after training must use it); between tests it goes back to the environment's."""
    from tspd import seeding

    seeding.use_legacy_streams(None)
    yield
    seeding.use_legacy_streams(None)


# ---- tiny targets -----------------------------------------------------------------------
class OneLinear(nn.Module):
    """Output is exactly linear1(x): the simplest possible target."""

    def __init__(self, d_in: int = 5, d_out: int = 3, bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.linear1(x)


class TwoLayer(nn.Module):
    """linear1 -> ReLU -> linear2; works on (B, d) and (B, T, d) inputs."""

    def __init__(self, d_in: int = 6, d_hidden: int = 4, d_out: int = 6):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.linear2(self.act(self.linear1(x)))


def make_gpt2(seed: int = 0):
    """A tiny randomly initialised GPT-2 (built offline), in eval mode."""
    import transformers  # in the dev extra: a missing one must fail these engine tests, not skip them
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    model.eval()
    return model


def make_cfg(sites, **sections) -> tspd.RunConfig:
    """RunConfig from a site list [(pattern, C), ...] and nested sections, e.g. train={"steps": 3}."""
    raw = {"sites": [{"pattern": p, "C": c} for p, c in sites], **copy.deepcopy(sections)}
    return tspd.RunConfig.model_validate(raw)


def set_exact_factors(dec: tspd.Decomposition, site: str) -> None:
    """Set V, U of `site` so that (V U)^T equals the target weight exactly up to float rounding
    (SVD of W^T; extra subcomponents beyond the rank get V = 0)."""
    from tspd.components import target_weight

    stand_in = dec._stand_ins[site]
    W = target_weight(stand_in.original, stand_in.kind).detach().double()  # d_out x d_in
    comps = dec.component(site)
    A, S, Bt = torch.linalg.svd(W.T, full_matrices=False)  # W^T = A diag(S) Bt
    r = S.shape[0]
    assert comps.C >= r, "test setup: C must be at least the rank"
    V = torch.zeros(comps.d_in, comps.C, dtype=torch.float64)
    U = torch.randn(comps.C, comps.d_out, dtype=torch.float64)
    V[:, :r] = A * S
    U[:r] = Bt
    with torch.no_grad():
        comps.V.copy_(V.float())
        comps.U.copy_(U.float())


def snapshot_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


@pytest.fixture
def gpt2():
    return make_gpt2(0)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (3, 10), generator=g)


# ---- tiny runs for the dashboard tests (tests/test_app*.py) -----------------------------
TINY_INDUCTION = [
    "target.n_tokens=8", "target.seq_len=8", "target.d_model=8", "sites.0.C=4", "sites.1.C=4", "sites.2.C=4",
    "ci.hidden=[4]", "ci.attention.d_attn=4", "ci.attention.max_len=8", "train.steps=6", "train.batch_size=8",
    "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=6", "train.faithfulness_warmup_steps=20",
    "train.log_every=1",
]


@pytest.fixture(scope="session")
def dashboard_root(tmp_path_factory):
    """A folder for the dashboard tests' runs (the server can serve it as a folder of runs)."""
    return tmp_path_factory.mktemp("dashboard")


@pytest.fixture(scope="session")
def induction_run(dashboard_root):
    """A tiny induction run folder (random target, a few steps) with a census and a harvest."""
    from tspd.app.harvest import harvest
    from tspd.cli import CONFIGS_DIR
    from tspd.decomposition import save_state
    from tspd.experiments import census_run, decompose_from_config
    from tspd.targets.induction import InductionTransformer

    out = dashboard_root / "induction"
    out.mkdir()
    # No consolidation: on a random target, pruning would switch off every piece the views show.
    cfg = tspd.RunConfig.from_yaml(CONFIGS_DIR / "induction.yaml", [*TINY_INDUCTION, "consolidate.at_frac=[]"])
    torch.manual_seed(0)
    t = cfg.target
    # The run folder's target is used as is: no target training in the test.
    save_state(InductionTransformer(t.n_tokens + 2, t.d_model, 2, t.seq_len), out / "target.safetensors")
    decompose_from_config(cfg, out, progress=False)
    census_run(out, n_sequences=100)
    harvest(out, n_examples=100)
    return out


@pytest.fixture(scope="session")
def tms_run(dashboard_root):
    """A tiny TMS 5-2 run folder (briefly trained target, a few steps), not harvested."""
    from tspd.cli import CONFIGS_DIR
    from tspd.experiments import decompose_from_config

    out = dashboard_root / "tms"
    cfg = tspd.RunConfig.from_yaml(CONFIGS_DIR / "tms-5-2.yaml", [
        "target.train_steps=300", "train.steps=6", "train.batch_size=64", "train.eval_every=3", "train.eval_batches=1",
        "train.log_every=1", "train.checkpoint_every=6", "train.faithfulness_warmup_steps=20",
    ])
    decompose_from_config(cfg, out, progress=False)
    return out


def assert_same_step(a, b, loss_tol=(1e-4, 1e-6), grad_tol=(1e-4, 1e-7)):
    """Two (terms, grads) results of one SPD step agree: every loss term (rel, abs) and every
    parameter gradient (rtol, atol)."""
    (t0, g0), (t1, g1) = a, b
    assert t0.keys() == t1.keys()
    for k in t0:
        assert t1[k] == pytest.approx(t0[k], rel=loss_tol[0], abs=loss_tol[1]), k
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=grad_tol[0], atol=grad_tol[1], msg=n)
