"""Shared tiny models and helpers for the tspd test suite (CPU, seconds, not minutes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tspd

# One thread: every model here is tiny, and with two threads each small matmul waits on an OpenMP
# barrier (milliseconds per op when the other core is busy).
torch.set_num_threads(1)


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
    transformers = pytest.importorskip("transformers")
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
