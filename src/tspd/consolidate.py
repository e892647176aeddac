"""Consolidation: merge subcomponents that are always active together into fewer rank-1 pieces.

A tspd addition, not part of SPD as the papers describe it (arXiv 2506.20790, 2511.08854). Short
CPU-sized runs end in a local optimum the long GPU schedules escape: several subcomponents of one
site switch on together on the same inputs (e.g. five on V0 at the first S of the induction task,
whose input there never changes) although one rank-1 piece would carry the same computation.
The minimality loss would prefer one, but gradient descent cannot rotate five rank-1 pieces into
one while their sum stays W.

`consolidate` does that rotation directly, keeping every site's sum V U exactly (faithfulness
is unchanged):

1. Per site, collect the inputs x and CI over some batches. Group the active subcomponents
   (CI > eval.active_threshold somewhere): a group starts from the most often active piece not
   yet grouped and grows by every ungrouped piece whose active inputs lie (for a share
   >= `overlap`) inside the union of the group's.
2. On the inputs where any member is active, the group's output is Y = x V_g U_g. Its top
   singular directions say how many output directions it really uses: r is the smallest number
   of them that leaves every member's own inputs with a relative output error <= `tol` (95th
   percentile over each member's inputs, worst member), so a piece active on few of the group's
   inputs keeps its direction. Nothing changes when r equals the group size.
3. Otherwise the group's matrix M = V_g U_g (d_in x d_out) is split into r "active" pieces
   (M b_j) b_j^T along Y's top output directions b_j, and the remainder M (I - B^T B), of rank at
   most k - r, into k - r pieces by its SVD. The remainder's output on the group's inputs is
   within `tol` of nothing, so those pieces can be ablated there and the training that follows turns
   their CI off. Active pieces take the slots of the members with the highest mean CI (their
   CI function already fires on those inputs); norms are balanced between u and v.
4. The remainder slots start switched off: their CI function's last bias drops until their CI
   logits are below 0 on every input looked at. Training can switch one back on if the output
   needs it (the lower leaky hard sigmoid passes gradient to dead logits).

5. With a pruning budget (`consolidate.prune`), pieces are then switched off outright where that
   costs at most the budget of CI-masked divergence each: per site, first every piece that never
   passes the active threshold on the batches (all together; one by one if together they cost
   more), then the active ones from the least to the most often active. This removes the pieces
   that fire on a few edge cases (M at the last positions, ...) which the minimality loss leaves
   on because they are rare, and which would otherwise each count as one more distinct piece.

6. The last consolidation (`final=True`: at_frac 1.0, after the last step, with no training to
   follow) makes every "off" decision hold beyond the batches it was judged on: each piece whose
   CI is 0 on every input of the batches (merge remainders, pruned pieces, pieces that never fire)
   has its last bias lowered by a further FINAL_MARGIN, so it cannot fire on an unseen input
   either. Without this, a remainder whose logit sat just below 0 on the 2048 merge sequences
   fired on one token of the census's 2000 and counted as one more distinct piece (induction seed
   3: K0 and V0 each had such a third piece). It costs nothing on the batches (their CI there is
   already 0); on unseen inputs it only removes pieces the batches said were not needed.

The optimiser's state of the changed factors is reset by the caller (training resumes with the
new pieces). Configured by the recipe's `consolidate` section (README, Configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tspd.decomposition import Batch, Decomposition, _key, position_mask


QUANTILE = 0.95  # the merge's error bound holds for this share of a group's inputs
FINAL_MARGIN = 100.0  # CI logits are O(1): a piece lowered this far stays off on any input


@dataclass
class Merge:
    """One consolidated group: the subcomponent slots, the rank kept, and the relative output error
    left on the group's inputs (95th percentile) by the kept pieces alone."""

    site: str
    slots: list[int]
    rank: int
    residual: float

    def to_dict(self) -> dict:
        return {"site": self.site, "slots": self.slots, "rank": self.rank, "residual": round(self.residual, 5)}


@dataclass
class Pruned:
    """Pieces switched off (their CI function's last bias lowered) and the CI-masked divergence
    that cost on the batches."""

    site: str
    slots: list[int]
    increase: float

    def to_dict(self) -> dict:
        return {"site": self.site, "pruned": self.slots, "increase": round(self.increase, 6)}


@dataclass
class SwitchedOff:
    """Pieces the final consolidation switched off for good (CI 0 on every input of its batches)."""

    site: str
    slots: list[int]

    def to_dict(self) -> dict:
        return {"site": self.site, "off_for_good": self.slots}


def co_active_groups(active: Tensor, overlap: float) -> list[list[int]]:
    """Groups of subcomponents (columns of the bool (n, C) `active`), leader first; see the module
    docstring. Pieces never active are left out."""
    counts = active.sum(0)
    order = [int(i) for i in torch.argsort(counts, descending=True, stable=True) if counts[i] > 0]
    grouped: set[int] = set()
    groups = []
    for lead in order:
        if lead in grouped:
            continue
        members, union = [lead], active[:, lead].clone()
        grown = True
        while grown:  # a piece joins when its active inputs lie (mostly) inside the group's union
            grown = False
            for j in order:
                if j in grouped or j in members:
                    continue
                if float((union & active[:, j]).sum()) >= overlap * float(counts[j]):
                    members.append(j)
                    union |= active[:, j]
                    grown = True
        grouped.update(members)
        groups.append(members)
    return groups


def output_errors(V: Tensor, U: Tensor, x: Tensor, members: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """For a group with V (d_in, k), U (k, d_out) on inputs x (n, d_in): its output directions b
    (rows, by singular value, only those within Y's numerical rank) and err[j], the relative
    output error left by the top j + 1 of them. err is the 95th percentile over each member's own
    inputs (`members`, bool (n, k): where member i is active; None: all inputs), and the worst
    member's, so a piece that is active on few of the group's inputs keeps its direction. None
    when the group's output is zero there."""
    y = x.double() @ (V.double() @ U.double())
    nonzero = y.norm(dim=1) > 0
    if not bool(nonzero.any()):
        return None
    _, sv, b = torch.linalg.svd(y[nonzero], full_matrices=False)
    b = b[: int((sv > sv[0] * 1e-9).sum())]  # directions past Y's rank are arbitrary, not M's
    kept = (y[nonzero] @ b.T).pow(2).cumsum(1) / y[nonzero].pow(2).sum(1, keepdim=True)
    rel = (1 - kept).clamp_min(0).sqrt()  # (rows, directions)
    groups = [torch.ones(len(rel), dtype=torch.bool)] if members is None else [m[nonzero] for m in members.T]
    err = torch.stack([torch.quantile(rel[g], QUANTILE, dim=0) for g in groups if bool(g.any())]).amax(0)
    return b, err


def split_at(V: Tensor, U: Tensor, b: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """New factors (V', U') with V' U' == V U: r active pieces (M b_j) b_j^T along the directions
    b[:r], then k - r pieces of the remainder M (I - B^T B) from its SVD."""
    k = V.shape[1]
    M = V.double() @ U.double()  # (d_in, d_out): the group's map, y = x M
    B = b[:r]  # (r, d_out), orthonormal rows
    v_act, u_act = (M @ B.T), B
    rest = M - M @ B.T @ B  # rank <= k - r
    p, sig, q = torch.linalg.svd(rest, full_matrices=False)
    n_rest = k - r
    # rest has rank <= min(k - r, d_in, d_out); slots beyond its rank get v = 0 and a unit u, so
    # they add nothing yet still receive gradients (with u = v = 0 a piece could never revive).
    n = min(n_rest, len(sig))
    sig = torch.where(sig[:n] > 1e-12 * max(float(sig[0]), 1e-30), sig[:n], torch.zeros_like(sig[:n]))
    v_rest = M.new_zeros(M.shape[0], n_rest)
    u_rest = M.new_zeros(n_rest, M.shape[1])
    v_rest[:, :n] = p[:, :n] * sig.sqrt()
    u_rest[:n] = q[:n] * sig.sqrt()[:, None]
    dead = [i for i in range(n_rest) if i >= n or float(sig[i]) == 0.0]
    if dead:
        fill = torch.randn(len(dead), M.shape[1], generator=torch.Generator().manual_seed(k), dtype=M.dtype).to(M.device)
        u_rest[dead] = fill / fill.norm(dim=1, keepdim=True)
    # Balance |v| and |u| for the active pieces (the remainder is balanced by construction).
    norms = v_act.norm(dim=0).clamp_min(1e-12)
    v_act, u_act = v_act / norms.sqrt(), u_act * norms.sqrt()[:, None]
    return torch.cat([v_act, v_rest], dim=1).to(V.dtype), torch.cat([u_act, u_rest], dim=0).to(U.dtype)


def split_group(V: Tensor, U: Tensor, x: Tensor, tol: float) -> tuple[Tensor, Tensor, int, float] | None:
    """(V', U', r, error) for the smallest r whose output error on x is <= tol; None when r == k."""
    out = output_errors(V, U, x)
    if out is None:
        return None
    b, err = out
    r = next((j + 1 for j in range(len(err)) if float(err[j]) <= tol), len(err))
    if r >= V.shape[1]:
        return None
    return (*split_at(V, U, b, r), r, float(err[r - 1]))


def match_inner(V2: Tensor, U2: Tensor, V0: Tensor, x: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """For a CI that reads the inner activations x v (ci.kind mlp): give each of the r active
    pieces the sign and RMS of x v that the old piece in its slot had on the group's inputs x (the
    SVD's sign is arbitrary and its scale another), scaling u inversely so V U is unchanged."""
    V2, U2 = V2.clone(), U2.clone()
    h_new, h_old = x @ V2[:, :r], x @ V0[:, :r]
    sign = torch.where((h_new * h_old).sum(0) < 0, -1.0, 1.0).to(V2.dtype)
    scale = h_old.pow(2).mean(0).sqrt() / h_new.pow(2).mean(0).sqrt().clamp_min(1e-12)
    c = sign * torch.where(scale > 0, scale, torch.ones_like(scale))
    V2[:, :r] *= c
    U2[:r] /= c[:, None]
    return V2, U2


def _write(comp, idx: Tensor, V2: Tensor, U2: Tensor, before: Tensor) -> bool:
    """Write the group's new factors if they keep its V U (float32 rounding aside); else leave
    the old ones and say so."""
    if float((V2 @ U2 - before).abs().max()) > 1e-4 * max(float(before.abs().max()), 1e-12):
        return False
    comp.V[:, idx], comp.U[idx] = V2, U2
    return True


def _merged_ci(g: Tensor, slots: list[int], r: int) -> Tensor:
    """CI as the merged group would have it: the r active slots on wherever any member was (the
    members' max), the remainder slots off."""
    g = g.clone()
    idx = torch.tensor(slots)
    g[..., idx[:r]] = g[..., idx].amax(-1, keepdim=True)
    g[..., idx[r:]] = 0.0
    return g


def _real_rows(t: Tensor, keep: Tensor | None) -> Tensor:
    """(rows, C) of a (..., C) tensor: the batch's real positions only when it has padding (`keep`,
    fitting t's leading shape), else every row."""
    if keep is not None and tuple(t.shape[:-1]) == tuple(keep.shape):
        return t[keep]
    return t.reshape(-1, t.shape[-1])


def _fresh_ci(dec: Decomposition, inputs: dict[str, Tensor], keep: Tensor | None) -> dict[str, Tensor]:
    """The CI on recorded site inputs from the CI functions now, 0 at padded positions (so that no
    statistic counts them: a padded position is never active)."""
    ci = dec.ci_from_logits(dec.ci_logits(inputs, keep))[0]
    if keep is None:
        return ci
    return {s: g.masked_fill(~keep[..., None], 0.0) if tuple(g.shape[:-1]) == tuple(keep.shape) else g for s, g in ci.items()}


def _ci_as_is(dec: Decomposition, inputs: dict[str, Tensor], s: str, off: Tensor, keep: Tensor | None = None) -> Tensor:
    """Site s's CI from its CI function now (fresh: the factors may have changed), with the `off`
    slots at 0 (as `_switch_off` will leave them on these inputs)."""
    g = _fresh_ci(dec, inputs, keep)[s].clone()
    g[..., off] = 0.0
    return g


def _switch_off(dec: Decomposition, s: str, slots: Tensor, runs: list) -> None:
    """Lower the CI function's last bias of `slots` until their logits are below 0 (by 0.5) on every
    (real) input of `runs` (the lower leaky sigmoid still lets training switch one back on if needed)."""
    fresh = [(dec.ci_logits(run[3], run[4])[s], run[4]) for run in runs]  # 'mlp' CI functions read x V, which may have changed
    top = torch.cat([_real_rows(z, keep)[:, slots] for z, keep in fresh]).amax(0)
    dec.ci_fns[_key(s)].output_bias()[slots] -= top.clamp_min(0) + 0.5


@torch.no_grad()
def consolidate(
    dec: Decomposition, batches: list[Batch], tol: float = 0.05, overlap: float = 0.9, max_increase: float | None = None,
    prune: float | None = None, final: bool = False,
) -> list[Merge | Pruned | SwitchedOff]:
    """Merge co-active subcomponents of every (non-embedding) site in place, then (with `prune`)
    switch off the pieces that cost at most `prune` each; returns the merges and prunings.

    With `max_increase`, a group's rank is chosen by function instead of by `tol`: the smallest r
    whose merge (remainder slots off, active slots on wherever a member was) raises the CI-masked
    output divergence on `batches` by at most `max_increase` (nats for KL) over the larger of the
    current one and the group's members all on wherever any of them is (the CI the merged pieces
    need: switching members on together has a cost of its own that no rank removes).
    With `final` (no training follows), a merge must also hold with the CI function as it is (its
    remainder off) within `max_increase` of the current divergence, and every piece whose CI ends at
    0 on every input of `batches` is then switched off for good (see the module docstring, step 6)."""
    changes, inputs = _consolidate(dec, batches, tol, overlap, max_increase, prune, final)
    if final:
        # A CI that reads x V (ci.kind mlp) sees new inner activations on a merged piece; keep the
        # merged pieces out of the final switch-off rather than trust its CI on them.
        keep = {(m.site, j) for m in changes if isinstance(m, Merge) and dec.ci_fns[_key(m.site)].uses_inner
                for j in m.slots[: m.rank]}
        changes += _switch_off_for_good(dec, inputs, keep)
    return changes


def _switch_off_for_good(
    dec: Decomposition, inputs: list[tuple[dict[str, Tensor], Tensor | None]], keep: set = frozenset()
) -> list[SwitchedOff]:
    """Lower the last bias of every piece with CI 0 on all of the batches (their recorded site
    inputs and real positions, `inputs`) by FINAL_MARGIN more; never the (site, slot) pairs in `keep`."""
    zs = [(dec.ci_logits(x, real), real) for x, real in inputs]  # fresh: the merges may have changed V and the biases
    out = []
    for s in dec.site_names:
        if dec.component(s).kind == "embedding":
            continue
        top = torch.cat([_real_rows(z[s], real) for z, real in zs]).amax(0)
        slots = torch.nonzero(top <= 0).flatten()  # CI = clamp(logit, 0, 1): 0 on every input
        slots = slots[torch.tensor([(s, int(j)) not in keep for j in slots], dtype=torch.bool)] if keep else slots
        if len(slots) == 0:
            continue
        dec.ci_fns[_key(s)].output_bias()[slots] -= FINAL_MARGIN
        out.append(SwitchedOff(s, slots.tolist()))
    return out


def _consolidate(
    dec: Decomposition, batches: list[Batch], tol: float, overlap: float, max_increase: float | None, prune: float | None,
    final: bool = False,
) -> tuple[list[Merge | Pruned], list[dict[str, Tensor]]]:
    """The merges and prunings (see `consolidate`), and each batch's recorded site inputs with its
    real positions. A padded batch's padded positions count nowhere (their CI is taken as 0)."""
    from tspd.losses import Reference, recon_passes

    cfg = dec.config
    thr = cfg.eval.active_threshold
    runs = []  # per batch: (batch, target output, CI per site, site inputs, real positions)
    for batch in batches:
        out, inputs = dec.run_target(batch)
        keep = position_mask(batch)
        runs.append((batch, out, _fresh_ci(dec, inputs, keep), inputs, keep))

    def masked_divergence(site: str | None = None, site_ci=None) -> float:
        total = 0.0
        for i, (batch, out, ci, *_, keep) in enumerate(runs):
            ci = {**ci, site: site_ci[i]} if site is not None else ci
            dec.run_target(batch)  # records the replayed blocks for this batch
            p = recon_passes("ci_masked_recon", dec, ci, torch.Generator())[0]
            ref = Reference(out, cfg.output.divergence, cfg.output.positions, keep=keep)
            total += float(ref.divergence(dec.run_pass(batch, p))) / len(runs)
        return total

    current = masked_divergence() if max_increase is not None or prune is not None else 0.0
    merges = []
    for s in dec.site_names:
        comp = dec.component(s)
        if comp.kind == "embedding":
            continue
        x = torch.cat([_real_rows(r[3][s], r[4]).float() for r in runs])
        g = torch.cat([_real_rows(r[2][s], r[4]).float() for r in runs])
        active = g > thr
        for members in co_active_groups(active, overlap):
            if len(members) < 2:
                continue
            rows = active[:, members].any(1)
            # Slots by mean CI on the group's inputs, highest first: the active pieces go there.
            slots = sorted(members, key=lambda j: -float(g[rows, j].mean()))
            idx = torch.tensor(slots)
            V0, U0 = comp.V[:, idx].clone(), comp.U[idx].clone()
            found = output_errors(V0, U0, x[rows], active[rows][:, idx])
            if found is None:
                continue
            b, err = found
            inner = dec.ci_fns[_key(s)].uses_inner

            def rewritten(rank: int) -> tuple[Tensor, Tensor]:
                V2, U2 = split_at(V0, U0, b, rank)
                return match_inner(V2, U2, V0, x[rows], rank) if inner else (V2, U2)

            if max_increase is None:
                r = next((j + 1 for j in range(len(err)) if float(err[j]) <= tol), len(err))
                if r >= len(slots):
                    continue
                if not _write(comp, idx, *rewritten(r), V0 @ U0):
                    continue
            else:
                r = None
                # The merge is judged against the group's pieces all on wherever any of them is
                # (the CI the merged pieces will have), so only the rotation's own cost counts.
                def merged(rank: int) -> list[Tensor]:  # every batch's CI of site s, the group merged to rank
                    return [_merged_ci(run[2][s], slots, rank) for run in runs]

                union = masked_divergence(s, merged(len(slots)))
                for cand in range(1, min(len(slots) - 1, len(b)) + 1):
                    if not _write(comp, idx, *rewritten(cand), V0 @ U0):
                        break
                    cis = merged(cand)
                    d = masked_divergence(s, cis)
                    ok = d <= max(current, union) + max_increase
                    if ok and final:
                        # No training follows to make the merged pieces fire where the members did:
                        # the merge must hold against the current divergence with the CI function as
                        # it is (remainder off), not the union's.
                        cis = [_ci_as_is(dec, run[3], s, idx[cand:], run[4]) for run in runs]
                        d = masked_divergence(s, cis)
                        ok = d <= current + max_increase
                    if ok:
                        r, current = cand, d
                        for run, g_new in zip(runs, cis):  # later groups are judged with this merge in place
                            run[2][s] = g_new
                        break
                if r is None:
                    comp.V[:, idx], comp.U[idx] = V0, U0
                    continue
            # The remainder starts switched off: its CI logits move below 0 on every input seen.
            _switch_off(dec, s, idx[r:], runs)
            merges.append(Merge(s, slots, r, float(err[r - 1])))
    if prune is None:
        return merges, [(run[3], run[4]) for run in runs]
    if max_increase is None:  # the merges by tol left the CI as it was on the merged groups' slots
        for run in runs:
            run[2].update(_fresh_ci(dec, run[3], run[4]))
        current = masked_divergence()
    for s in dec.site_names:
        if dec.component(s).kind == "embedding":
            continue
        g = torch.cat([_real_rows(r[2][s], r[4]) for r in runs])
        count, on = (g > thr).sum(0), g.amax(0) > 0
        quiet = [j for j in range(g.shape[-1]) if bool(on[j]) and int(count[j]) == 0]
        active = sorted((j for j in range(g.shape[-1]) if int(count[j]) > 0), key=lambda j: int(count[j]))
        # The quiet pieces together first (usually free); one by one when together they cost more.
        trials = ([quiet] if quiet else []) + [[j] for j in quiet if len(quiet) > 1] + [[j] for j in active]
        done: set[int] = set()
        for slots in trials:
            if done.issuperset(slots):
                continue
            cis = []
            for run in runs:
                g_new = run[2][s].clone()
                g_new[..., slots] = 0.0
                cis.append(g_new)
            d = masked_divergence(s, cis)
            if d <= current + prune:
                merges.append(Pruned(s, list(slots), d - current))
                current = d
                for run, g_new in zip(runs, cis):
                    run[2][s] = g_new
                _switch_off(dec, s, torch.tensor(slots), runs)
                done.update(slots)
    return merges, [(run[3], run[4]) for run in runs]
