"""The compiled loops (tspd.native): the very values and generator states of torch's draws; the KL
and its gradient to fp32 rounding."""

from __future__ import annotations

import shutil

import pytest
import torch

import tspd
from tspd import native
from tspd.masks import torch_uniform, uniform

needs_cc = pytest.mark.skipif(
    not native.enabled() or not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler (or TSPD_NATIVE=0): torch's ops run instead",
)


@needs_cc
def test_library_builds_and_passes_its_checks():
    assert native.rng_library() is not None


@needs_cc
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_masks_uniform_equals_torch_draw_and_state(seed):
    a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    # Odd sizes (a word's unused lanes), a twist crossed mid-draw, mask and delta shapes, fp64 and bf16.
    for shape, dtype in [((3,), torch.float32), ((64, 64, 100), torch.float32), ((5, 1251), torch.float32),
                         ((64, 64), torch.float32), ((2, 3, 7), torch.float64), ((8, 128, 256), torch.bfloat16)]:
        ours = uniform(shape, a, dtype, "cpu")
        ref = torch_uniform(shape, b, dtype, "cpu")
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert torch.equal(ours, ref), shape
        assert torch.equal(a.get_state(), b.get_state())
    # Whatever draws next from the generator (torch's own kernels) sees the same stream.
    assert torch.equal(torch.rand(100, generator=a), torch.rand(100, generator=b))
    assert torch.equal(torch.randn(100, generator=a), torch.randn(100, generator=b))


@needs_cc
def test_state_after_torch_normal_draws_is_kept():
    # randn keeps a cached normal sample in the generator state; the draw must carry it through.
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.randn(1, generator=a), torch.randn(1, generator=b)
    assert torch.equal(uniform((1000,), a, torch.float32, "cpu"), torch_uniform((1000,), b, torch.float32, "cpu"))
    assert torch.equal(a.get_state(), b.get_state())


@needs_cc
def test_word_conversion_matches_randint_including_the_all_ones_word():
    # Pairs of 32-bit outputs (first, second) -> torch.randint's int64 (((first << 32) | second) % (2^64 - 1)
    # - 2^63) -> its int16 lanes -> (2^15 + 1/2 + k) / 2^16. The all-ones pair (1 in 2^64) maps to -2^63.
    import ctypes

    pairs = [(0xFFFFFFFF, 0xFFFFFFFF), (0, 0), (0x80000000, 1), (0x12345678, 0x9ABCDEF0), (0xFFFFFFFF, 0xFFFFFFFE)]
    buf = torch.tensor([v for p in pairs for v in p], dtype=torch.int64).to(torch.int32)  # wraps to the same bits
    out = torch.empty(4 * len(pairs) - 1)  # the last word's last lane unused
    native.rng_library().tspd_words_to_uniform(ctypes.c_void_p(buf.data_ptr()), len(pairs), ctypes.c_void_p(out.data_ptr()), out.numel())
    expected = []
    for first, second in pairs:
        v = ((first << 32) | second) % (2**64 - 1)
        v = (v + 2**63) % 2**64  # - 2^63 as an unsigned 64-bit add
        for lane in range(4):
            k = (v >> (16 * lane)) & 0xFFFF
            k = k - 65536 if k >= 32768 else k
            expected.append((2**15 + 0.5 + k) / 2**16)
    assert out.tolist() == expected[: out.numel()]


def test_disabled_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("TSPD_NATIVE", "0")
    native.clear()
    try:
        assert native.uniform16(10, torch.Generator().manual_seed(0)) is None
        a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(uniform((4, 5), a, torch.float32, "cpu"), torch_uniform((4, 5), b, torch.float32, "cpu"))
    finally:
        monkeypatch.undo()
        native.clear()


@needs_cc
def test_training_step_is_the_same_with_and_without_the_compiled_loops(monkeypatch):
    # Every loss term and every parameter after a few steps of stochastic + layerwise + subset
    # reconstruction with the delta component: equal with the compiled loops and with torch's ops.
    from conftest import make_cfg, make_gpt2
    from tspd.losses import compute_losses
    from tspd.train import make_optimizer, optimizer_step

    def run():
        torch.manual_seed(0)
        cfg = make_cfg([("transformer.h.*.mlp.c_fc", 8), ("transformer.h.*.attn.c_attn", 6)],
                       losses={"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "stochastic_recon_subset": 1.0},
                       masks={"delta_component": True})
        dec = tspd.Decomposition(make_gpt2(), cfg)
        opt = make_optimizer(dec)
        batch = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
        terms = []
        for i in range(3):
            total, t, _ = compute_losses(dec, batch, i, torch.Generator().manual_seed(10 + i))
            optimizer_step(dec, opt, total)
            terms.append(t)
        return terms, [p.detach().clone() for p in dec.parameters()]

    native.clear()
    fast = run()
    monkeypatch.setenv("TSPD_NATIVE", "0")
    native.clear()
    try:
        slow = run()
    finally:
        monkeypatch.delenv("TSPD_NATIVE")
        native.clear()
    assert fast[0] == slow[0]
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))


@needs_cc
@pytest.mark.parametrize("before", [619, 620, 621, 622, 623, 624, 1247])
def test_draws_across_a_twist_from_every_nearby_state(before):
    # States 0-5 outputs short of a twist (and one a whole block later): the draw crosses it mid-word.
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for g in (a, b):
        torch.randint(0, 2**31, (before,), generator=g)  # one 32-bit output each
    assert torch.equal(uniform((9,), a, torch.float32, "cpu"), torch_uniform((9,), b, torch.float32, "cpu"))
    assert torch.equal(a.get_state(), b.get_state())


@needs_cc
def test_an_inconsistent_state_is_refused_not_read_past():
    g = torch.Generator().manual_seed(0)
    st = g.get_state()
    st[8:12] = torch.tensor([600], dtype=torch.int32).view(torch.uint8)  # left 600 with next 0 would read past
    st[16:24] = torch.tensor([300], dtype=torch.int64).view(torch.uint8)
    out = native._draw(native.rng_library(), 10, _Holder(st))
    assert out is None


class _Holder:
    """A stand-in generator whose state the C code reads (torch would refuse to set this one)."""

    def __init__(self, st):
        self.st = st

    def get_state(self):
        return self.st.clone()

    def set_state(self, st):
        self.st = st


def test_shared_temp_folders_must_be_private(tmp_path):
    import os

    mine = tmp_path / "ok"
    assert native._private(mine, os.getuid())
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert not native._private(open_to_all, os.getuid())
    assert not native._private(mine, os.getuid() + 1)


@needs_cc
@pytest.mark.parametrize("rows,V,n,scale", [(1, 1, 1, 1.0), (7, 9, 3, 3.0), (64, 130, 4, 10.0), (16, 1024, 2, 50.0)])
def test_kl_rows_values_and_gradient_match_log_softmax(rows, V, n, scale):
    """The KL loop: per pass sum p log_softmax(x), and psum softmax(x) - p, to fp32 rounding
    (its exp is its own), for vocabularies that are and are not multiples of 8."""
    gen = torch.Generator().manual_seed(rows * V)
    p = torch.randn(rows, V, generator=gen).mul(scale).log_softmax(-1).exp()
    x = torch.randn(n * rows, V, generator=gen).mul(scale)
    x[-1, 0] = -1e4  # exp underflows to 0
    got = native.kl_rows(x, p, p.sum(-1), n)
    assert got is not None
    totals, g = got
    lsm = x.double().view(n, rows, V).log_softmax(-1)
    torch.testing.assert_close(totals, (p.double() * lsm).sum((-1, -2)), rtol=1e-5, atol=1e-5)
    want = lsm.exp() * p.double().sum(-1, keepdim=True) - p.double()
    torch.testing.assert_close(g.double().view(n, rows, V), want, rtol=1e-4, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("rows,V,n", [(1, 1, 1), (7, 9, 3), (64, 1030, 2)])
def test_kl_rows_on_bf16_logits_match_log_softmax_of_their_fp32_values(rows, V, n):
    """bf16 logits (the output head under autocast) are read as x.float(): the same values and an
    fp32 gradient as for the widened fp32 tensor, bit for bit (one arithmetic for both)."""
    gen = torch.Generator().manual_seed(rows + V)
    p = torch.randn(rows, V, generator=gen).mul(4).log_softmax(-1).exp()
    x = torch.randn(n * rows, V, generator=gen).mul(8).bfloat16()
    got, want = native.kl_rows(x, p, p.sum(-1), n), native.kl_rows(x.float(), p, p.sum(-1), n)
    assert got is not None and want is not None
    assert got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lsm = x.double().view(n, rows, V).log_softmax(-1)
    torch.testing.assert_close(got[0], (p.double() * lsm).sum((-1, -2)), rtol=1e-5, atol=1e-5)


@needs_cc
def test_kl_rows_declines_what_it_does_not_handle():
    p = torch.rand(4, 6).softmax(-1)
    x = torch.randn(8, 6)
    assert native.kl_rows(x, p, p.sum(-1), 2) is not None
    assert native.kl_rows(x.double(), p.double(), p.sum(-1).double(), 2) is None  # fp32 or bf16 logits only
    assert native.kl_rows(x.half(), p, p.sum(-1), 2) is None
    assert native.kl_rows(x.bfloat16(), p.bfloat16(), p.sum(-1), 2) is None  # the target in fp32
    assert native.kl_rows(torch.randn(6, 8).t(), p, p.sum(-1), 2) is None  # not contiguous
    assert native.kl_rows(x, p, p.sum(-1), 3) is None  # rows are not n x the target's
    assert native.kl_rows(torch.randn(65 * 4, 6), p, p.sum(-1), 65) is None  # more than 64 passes


@needs_cc
def test_compiled_divergences_through_the_kl_loop_match_eager(monkeypatch):
    """Under train.compile the reconstruction KL runs through the loop: values and gradients as
    the eager KL's to fp32 rounding; with TSPD_NATIVE=0 the compiled KL instead, to the same."""
    from tspd.losses import Reference

    torch.manual_seed(0)
    target = torch.randn(3, 5, 11)
    out = (target.repeat(3, 1, 1) + torch.randn(9, 5, 11)).requires_grad_()
    results = []
    for compiled, env in ((False, "1"), (True, "1"), (True, "0")):
        monkeypatch.setenv("TSPD_NATIVE", env)
        native.clear()
        assert (native.kl_library() is not None) == (env == "1")
        out.grad = None
        v = Reference(target, "kl", compiled=compiled).divergences(out, 3)
        (v * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        results.append((v.detach(), out.grad.clone()))
    native.clear()
    for v, g in results[1:]:
        torch.testing.assert_close(v, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, results[0][1], rtol=1e-5, atol=1e-7)


@needs_cc
def test_compiled_divergences_of_bf16_logits_through_the_kl_loop(monkeypatch):
    """bf16 logits (autocast) take the loop too: values as the compiled KL's to fp32 rounding, the
    gradient in bf16 (out's dtype), within one bf16 rounding of the compiled KL's."""
    from tspd.losses import Reference

    torch.manual_seed(1)
    target = torch.randn(4, 6, 37)
    out = (target.repeat(2, 1, 1) + torch.randn(8, 6, 37)).bfloat16().requires_grad_()
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("TSPD_NATIVE", env)
        native.clear()
        assert (native.kl_rows(out.detach().reshape(-1, 37), target.reshape(-1, 37).softmax(-1), torch.ones(24), 2) is None) == (env == "0")
        out.grad = None
        v = Reference(target, "kl", compiled=True).divergences(out, 2)
        (v * torch.tensor([1.0, 3.0])).sum().backward()
        assert out.grad.dtype == torch.bfloat16
        results.append((v.detach(), out.grad.clone()))
    native.clear()
    (v1, g1), (v0, g0) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1.float(), g0.float(), rtol=2 ** -7, atol=1e-9)


@needs_cc
@pytest.mark.parametrize("leak,eps,p", [(0.01, 1e-12, 0.9), (0.0, 1e-6, 0.1), (0.2, 1e-3, 1.5)])
def test_ci_chain_loop_matches_fp64(leak, eps, p):
    """The CI chain's loop: lower exactly clamp(z, 0, 1); the minimality sum and q to fp32 rounding
    of the fp64 values (its log and exp are its own)."""
    z = torch.cat([torch.randn(64, 64, 100, generator=torch.Generator().manual_seed(1)).flatten() * 3,
                   torch.tensor([0.0, 1.0, 1e-20, 50.0, -50.0])])
    got = native.ci_min(z, leak, eps, p)
    assert got is not None
    lower, total, q = got
    w_lower, w_total, w_q = native._ci_min_reference(z, leak, eps, p)
    assert torch.equal(lower.double(), w_lower)
    assert total == pytest.approx(w_total, rel=1e-6)
    torch.testing.assert_close(q.double(), w_q, rtol=2e-6, atol=0.0)


@needs_cc
def test_ci_chain_loop_declines_what_it_does_not_handle():
    z = torch.randn(8, 5)
    assert native.ci_min(z, 0.01, 1e-12, 0.9) is not None
    assert native.ci_min(z.t(), 0.01, 1e-12, 0.9) is None  # not contiguous
    assert native.ci_min(z.bfloat16(), 0.01, 1e-12, 0.9) is None  # fp32 only (autocast runs the compiled chain)
    assert native.ci_min(z, 0.01, 1e-40, 0.9) is None  # eps below fp32's normal range
    assert native.ci_min(z, 0.01, 1e-12, 9.0) is None  # p out of the checked range


@needs_cc
def test_kl_loop_backward_twice_on_one_graph_says_why():
    from tspd.losses import Reference

    target = torch.randn(2, 3, 5)
    out = torch.randn(4, 3, 5, requires_grad=True)
    v = Reference(target, "kl", compiled=True).divergences(out, 2).sum()
    v.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        v.backward()


@needs_cc
def test_ci_chain_loop_edge_cases_as_torch():
    """Review cases: a tiny eps whose eps^p would sit at the loop's exp floor runs the compiled chain
    instead (the minimality gradient at z = 0 stays 0); inf and NaN logits give inf/NaN as torch;
    no rows give a nan mean, not an error; the self-checks hold under a float64 default dtype."""
    import math

    from tspd.losses import _CIAndMinimality

    assert native.ci_min(torch.tensor([0.0, 0.5]), 0.01, 1e-37, 2.0) is None  # p log eps < -87
    z = torch.tensor([0.0, 0.5, 1e-25, 0.3], requires_grad=True)
    lower, total = _CIAndMinimality.apply(z, 0.01, 1e-37, torch.tensor(2.0))
    total.backward()
    assert float(z.grad[0]) == 0.0 and float(z.grad[2]) == 0.0
    lower, total, q = native.ci_min(torch.tensor([math.inf, math.nan, 0.5]), 0.05, 1e-12, 0.9)
    assert math.isnan(total) and math.isnan(float(lower[1])) and float(lower[0]) == 1.0 and math.isnan(float(q[0]))
    lower, total = _CIAndMinimality.apply(torch.zeros(0, 5), 0.01, 1e-12, torch.tensor(0.9))
    assert lower.shape == (0, 5) and math.isnan(float(total))
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        native.clear()
        assert native.ci_min_library() is not None and native.kl_library() is not None
    finally:
        torch.set_default_dtype(before)
        native.clear()


def test_build_tries_the_flags_best_first_without_repeats(monkeypatch):
    monkeypatch.setattr(native, "_cpu_identity", lambda: "flags : avx2")
    sets = native._build_flag_sets()
    assert sets[0] == native.FLAGS  # -march=native and OpenMP
    assert ["-march=native" in f for f in sets] == [True, False, True, False]
    assert ["-fopenmp" in f for f in sets] == [True, True, False, False]
    monkeypatch.setattr(native, "_cpu_identity", lambda: None)  # no CPU to key a native build on
    sets = native._build_flag_sets()
    assert len(sets) == 2 and not any("-march=native" in f for f in sets) and "-fopenmp" in sets[0]


@needs_cc
def test_library_built_without_openmp_passes_its_checks(tmp_path, monkeypatch):
    # A compiler without OpenMP: the build falls back to flags without -fopenmp and the loops run on one thread.
    import subprocess

    real = subprocess.run

    def no_openmp(cmd, *a, **k):
        if "-fopenmp" in cmd:
            return subprocess.CompletedProcess(cmd, 1, b"", b"no omp.h")
        return real(cmd, *a, **k)

    monkeypatch.setattr(native.subprocess, "run", no_openmp)
    path = native._build(tmp_path)
    assert path is not None and path.is_file()
    import ctypes

    lib = native._declare(ctypes.CDLL(str(path)))
    assert native._kl_matches(lib) and native._ci_min_matches(lib) and native._rng_matches(lib)
