"""Decomposition: a frozen target plus the rank-1 components and CI functions of its sites.

Example:
    >>> import torch, tspd
    >>> from tspd.targets.tms import TMSModel
    >>> target = TMSModel(n_features=5, d_hidden=2)
    >>> cfg = tspd.RunConfig.model_validate({"sites": [{"pattern": "linear*", "C": 8}]})
    >>> dec = tspd.Decomposition(target, cfg)
    >>> ci = dec.causal_importance(torch.rand(3, 5))
    >>> ci["linear1"].shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import threading
import tempfile
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tspd.components import (
    Components, PassStarts, Segment, SiteError, SiteModule, SiteState, SiteTarget, check_site_hooks, resolve_sites, site_kind,
    target_weight,
)
from tspd.config import RunConfig
from tspd.fastlinear import (
    FastLinear,
    StandIn,
    Swap,
    fast_equivalents,
    linear,
    onednn_available,
    onednn_head_is_faster,
    slot,
    swap_in_place,
    untouched,
    use_onednn,
)
from tspd.importance import CIFunction, lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from tspd.masks import Pass

Batch = Tensor | dict[str, Tensor]


class CompiledTanhGELU(nn.Module):
    """GELU with the tanh approximation as x * sigmoid(2 a) (= 0.5 x (1 + tanh a), a = sqrt(2/pi)
    (x + 0.044715 x^3)) under torch.compile: one loop each way. torch's own tanh-GELU kernels are
    slow on this host's CPU: fwd + bwd of (24, 128, 512) fp32 2.58 ms against 1.79 ms compiled and
    1.53 ms for the erf GELU (median of 15, one-off script); outputs agree to ~5e-7. Compiled only
    where gradients are taken (the training passes): runs without gradients (the target run,
    analysis, a loaded decomposition) keep torch's kernel and need no compiler."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return _compiled_tanh_gelu()(x)
        return F.gelu(x, approximate="tanh")


def _tanh_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@functools.cache
def _compiled_tanh_gelu():
    return torch.compile(_tanh_gelu)


# Modules of common targets computed op by op in Python, with a fused kernel for the same function,
# swapped in while a Decomposition runs the target: GPT-2's tanh-approximated GELU is 8 ops forward
# and more backward; F.gelu(approximate="tanh") is one each (outputs agree to ~1e-7), and with
# train.compile one compiled loop each.
FUSED_EQUIVALENTS = {
    "NewGELUActivation": lambda compiled: CompiledTanhGELU() if compiled else nn.GELU(approximate="tanh"),
}


def fused_equivalents(model: nn.Module, compiled: bool = False) -> list[Swap]:
    """A swap to its fused replacement for every module of `model` with an entry in FUSED_EQUIVALENTS
    (for `swap_in_place`); `compiled`: the torch.compile'd replacements where there are some."""
    return [
        (*slot(model, n), m, FUSED_EQUIVALENTS[type(m).__name__](compiled))
        for n, m in model.named_modules()
        if type(m).__name__ in FUSED_EQUIVALENTS
    ]


def swap_modules(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each replacement at its module path; returns (parent, child, original) to undo with restore_modules."""
    swapped = []
    for name, module in replacements:
        parent, child = slot(model, name)
        swapped.append((parent, child, parent._modules[child]))
        parent._modules[child] = module
    return swapped


def restore_modules(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child, original in reversed(swapped):
        parent._modules[child] = original


def _key(site: str) -> str:
    return site.replace(".", "__")


def output_tensor(out: Any) -> Tensor:
    """The prediction tensor of a model output: `.logits` for Hugging Face (or a dict's "logits"),
    the first item of a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out:
        first = out[0]
        if isinstance(first, Tensor) and first.dim() > 0:
            return first
        what = f"a {first.dim()}-d tensor" if isinstance(first, Tensor) else f"a {type(first).__name__}"
        raise TypeError(f"the model returned a {type(out).__name__} whose first item is {what}: tspd reads the first "
                        "item of a tuple as the prediction; return the prediction first, or an object or dict with logits")
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; return a Tensor, a tuple with the "
                    "prediction first, or an object or dict with logits")


def batch_size(batch: Batch) -> int:
    """Examples in a batch: a tensor's dim 0; for keyword inputs, that of `input_ids` (or
    `inputs_embeds`) if present, else the dim 0 that most of its tensors share, the first tensor's
    on a tie (sizes of 1 count only when all are 1: a (1, T) `position_ids` broadcasts over the
    batch; a (T, T) attention mask next to (B, T, d) inputs does not decide it)."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a Tensor or a dict of keyword inputs; got a {type(batch).__name__}. Yield the "
                        "model's inputs only (e.g. x, not (x, y)), or a dict of its keyword arguments")
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(batch.get(key), Tensor) and batch[key].dim() > 0:
            return batch[key].shape[0]
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0]
    if not sizes:
        raise ValueError(f"a batch of keyword inputs needs a tensor with the examples on dim 0; got keys {list(batch)}")
    counted = [n for n in sizes if n != 1] or sizes
    return max(dict.fromkeys(counted), key=counted.count)


def _slice_batch(batch: Batch, lo: int, hi: int, rows: int) -> Batch:
    """Examples lo..hi-1 of a batch of `rows` (keyword inputs that are not per example pass as given)."""
    if isinstance(batch, Tensor):
        return batch[lo:hi]
    return {k: v[lo:hi] if per_example(v, rows) else v for k, v in batch.items()}


def repeat_batch(batch: Batch, n: int) -> Batch:
    """The batch n times along dim 0 (for n stacked passes); keyword inputs that are not tensors of
    the batch's size on dim 0 (a broadcast (1, T) tensor, a flag) are passed as they are."""
    if n == 1:
        return batch
    if isinstance(batch, Tensor):
        return batch.repeat(n, *([1] * (batch.dim() - 1)))
    rows = batch_size(batch)
    return {k: repeat_batch(v, n) if per_example(v, rows) else v for k, v in batch.items()}


def per_example(value: Any, rows: int) -> bool:
    """Whether a keyword input holds one entry per example (a tensor with `rows` on dim 0): what
    stacking repeats and torchrun shards; anything else (a (1, T) tensor, a flag) passes as given."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows


_FASTPATH = {"depth": 0, "saved": True}
_FASTPATH_GUARD = threading.Lock()


def _fastpath_off(enter: bool) -> None:
    """torch's process-wide MHA fast-path flag, off while any Decomposition (in any thread) stands in
    for its target's modules, and back as it was when the last one leaves."""
    with _FASTPATH_GUARD:
        if enter:
            if _FASTPATH["depth"] == 0:
                _FASTPATH["saved"] = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            _FASTPATH["depth"] += 1
        else:
            _FASTPATH["depth"] -= 1
            if _FASTPATH["depth"] == 0:
                torch.backends.mha.set_fastpath_enabled(_FASTPATH["saved"])


_TARGET_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_TARGET_LOCKS_GUARD = threading.Lock()


def target_lock(target: nn.Module) -> threading.RLock:
    """The one re-entrant lock of a target model. A Decomposition wires the target to its
    stand-ins for each forward and keeps per-call state in them, so two threads running passes on
    one target (through one Decomposition or two) would undo each other's wiring mid-forward:
    tspd's entry points that run the target hold this lock, one thread at a time per model."""
    with _TARGET_LOCKS_GUARD:
        lock = _TARGET_LOCKS.get(target)
        if lock is None:
            lock = _TARGET_LOCKS[target] = threading.RLock()
        return lock


def one_thread_per_target(fn):
    """Run `fn(dec, ...)` holding `target_lock(dec.target)`."""

    @functools.wraps(fn)
    def locked(dec, *args, **kwargs):
        with target_lock(dec.target):
            return fn(dec, *args, **kwargs)

    return locked


def position_mask(batch: Batch) -> Tensor | None:
    """The batch's real (not padded) positions: its `attention_mask` as a bool (batch, positions)
    tensor when a keyword batch has one with some position padded, else None (nothing to leave out)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or padding_not_readable(batch):
        return None
    keep = mask.bool()
    return None if bool(keep.all()) else keep


def padding_not_readable(batch: Batch) -> str | None:
    """Why a batch's 2-D attention_mask cannot be read as its padding, if it cannot: an
    encoder-decoder batch (the mask is the encoder's; the output is the decoder's), or an additive
    float mask (0 where real, a large negative number where padded)."""
    if not isinstance(batch, dict):
        return None
    if any(k.startswith("decoder_") for k in batch):
        return "it is an encoder-decoder batch, whose attention_mask pads the encoder's input, not the decoder's output"
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and additive_mask(mask):
        return "its attention_mask is additive (0 where real, negative where padded), not a 0/1 mask"
    return None


def additive_mask(mask: Tensor) -> bool:
    """Whether a float attention mask is additive (0 where real, negative where padded; all 0 when
    nothing is) rather than 1/0."""
    return mask.is_floating_point() and (bool((mask < 0).any()) or not bool((mask > 0).any()))


def mask_pads(mask: Tensor) -> bool:
    """Whether an attention mask (1/0, or additive) marks any position padded."""
    return bool((mask < 0).any()) if additive_mask(mask) else bool((mask == 0).any())


def row_weights(keep: Tensor | None, lead: tuple[int, ...] | torch.Size) -> Tensor | None:
    """Per-row weights that turn a mean over the (batch, positions) rows `lead` into a mean over the
    real positions only: keep / (fraction of positions kept), so that they average to 1. None when
    there is no mask or it does not fit `lead` (outputs without positions, other lengths)."""
    if keep is None or tuple(keep.shape) != tuple(lead):
        return None
    kept = int(keep.sum())
    if kept == 0:
        raise ValueError("no real position is left to average over: every position of the batch (or every one "
                         "output.positions names, counted among each row's real tokens) is padding; drop such batches")
    return keep.float() * (keep.numel() / kept)


# Keyword inputs that only ask the model for its own loss: tspd never uses it, and a pass that stops
# before the output head would hand that loss hidden states instead of logits.
LOSS_ONLY_KEYS = ("labels",)


def call_target(model: nn.Module, batch: Batch) -> Tensor:
    if isinstance(batch, dict):
        return output_tensor(model(**{k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}))
    return output_tensor(model(batch))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: mkstemp creates files readable by their owner only, which would keep a shared run
# folder's results from collaborators; each written file gets the mode a plain open() would give.
_FILE_MODE = 0o666 & ~_umask()


def _temp_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of `atomic_write_bytes`' temporary files for `path`."""
    return f".{path.name}.", ".tmp"


def leftover_temps(path: Path) -> list[Path]:
    """Temporary files of `atomic_write_bytes(path, ...)` calls that a kill cut off."""
    prefix, suffix = _temp_affixes(path)
    return list(path.parent.glob(f"{prefix}*{suffix}"))


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temporary file in the same folder, flushed to disk, and rename, so neither a kill
    nor a machine's crash leaves half a file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# What `atomic_write_bytes` names its temporary files: "." + the file's name + "." + mkstemp's
# 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_leftover_temps(folder: Path) -> list[Path]:
    """Delete the temporary files of `atomic_write_bytes` calls a kill cut off in `folder` (names
    as it makes them, not any hidden .tmp file); call it only while holding the folder (`run_folder_lock`)."""
    gone = [p for p in folder.glob(".*.tmp") if p.is_file() and _TEMP_NAME.match(p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class RunFolderBusy(RuntimeError):
    """Another process (or thread) is writing to the run folder."""


LOCK_NAME = ".tspd.lock"
# folder -> [file descriptor, depth, owning thread]: re-entrant within the thread that holds it.
_HELD_LOCKS: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) must not keep its parent's folders held: its copy
    of each lock's descriptor is closed (the parent's stays, so the parent keeps the lock)."""
    for fd, *_ in _HELD_LOCKS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _open_lock_file(folder: Path, key: Path) -> int:
    """The folder's lock file, opened for writing (made if missing), or read-only where it is another
    user's in a shared folder (a lock needs only a descriptor)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except PermissionError:
            if not (key / LOCK_NAME).exists():
                raise
            return os.open(key / LOCK_NAME, os.O_RDONLY)
    except PermissionError as e:
        raise PermissionError(f"cannot write in {folder} ({e.strerror}): give the run a folder you can write to (--out DIR)") from e


@contextlib.contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for writing: a second tspd process (or thread) that tries to write a run
    there (a fresh run would move or delete this one's files under it) fails at once, naming the
    holder. An advisory lock on `folder/.tspd.lock` (released by the OS if the process dies, so a
    kill leaves no stale lock; not kept by forked children); re-entrant within the holding thread;
    a no-op where fcntl is missing or the file system has no locks."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder: give the run a folder (--out DIR)")
    key = folder.resolve()
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD_LOCKS.get(key)
        if held is not None and held[2] != me:
            raise RunFolderBusy(f"another thread of this process is writing to {folder}: give this run another folder (--out DIR)")
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    created = not folder.exists()
    for _attempt in range(5):
        fd = _open_lock_file(folder, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks on this file system (some NFS, FUSE)
                os.close(fd)
                yield
                return
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise RunFolderBusy(
                f"another tspd process{f' (pid {holder})' if holder.isdigit() else ''} is writing to {folder}: wait for "
                "it to finish, or give this run another folder (--out DIR)") from None
        try:  # the file locked must still be the folder's (a failed run removes its new folder and lock file)
            same = os.fstat(fd).st_ino == os.stat(key / LOCK_NAME).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunFolderBusy(f"could not hold {folder}: its lock file keeps being replaced; try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError:  # opened read-only: the holder's pid is not recorded
        pass
    with _HELD_GUARD:
        _HELD_LOCKS[key] = [fd, 1, me]
    failed = True
    try:
        yield
        failed = False
    finally:
        with _HELD_GUARD:
            _HELD_LOCKS.pop(key, None)
        if failed and created and [p.name for p in key.iterdir()] == [LOCK_NAME]:
            (key / LOCK_NAME).unlink()  # a run that failed before writing anything leaves no folder it made
            key.rmdir()
        os.close(fd)  # releases the lock


def unreadable(path: Path, err: Exception, fix: str) -> ValueError:
    """The error for a file tspd wrote that cannot be read back (cut short, overwritten, damaged)."""
    return ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
                      f"it is damaged (e.g. a copy cut short). {fix}")


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    atomic_write_bytes(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2)))


def save_state(module: nn.Module, path: Path) -> None:
    """A module's state dict as safetensors, written atomically."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, lambda p: save_file(state, p))


class Decomposition(nn.Module):
    """A target model's chosen weights written as sums of rank-1 subcomponents, with CI functions.

    The target is held, never owned: its parameters are not in `parameters()`, never trained, and
    every pass restores the module tree, requires_grad flags and train/eval mode it found.
    """

    def __init__(self, target: nn.Module, config: RunConfig):
        super().__init__()
        self.__dict__["target"] = target
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        self.site_names: list[str] = []
        self.site_kinds: dict[str, str] = {}
        self.factors = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self._stand_ins: dict[str, SiteModule] = {}
        modules = dict(target.named_modules())
        first = next(target.parameters(), None)
        for name, C in resolve_sites(target, [(s.pattern, s.C) for s in config.sites]):
            module = modules[name]
            check_site_hooks(name, module)
            kind = site_kind(module)
            w = target_weight(module, kind)
            if w.dtype != first.dtype:
                raise SiteError(f"site {name!r} has a {w.dtype} weight but the model's first parameter is {first.dtype}: "
                                "tspd's factors and CI take one dtype; cast the model to one (e.g. model.float())")
            d_out, d_in = w.shape
            comps = Components(kind, d_in, d_out, C, generator=gen)
            ci_in = C if (kind == "embedding" or config.ci.kind == "mlp") else d_in
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                ci_fn = CIFunction(config.ci, ci_in, C)
            self.site_names.append(name)
            self.site_kinds[name] = kind
            self.factors[_key(name)] = comps
            self.ci_fns[_key(name)] = ci_fn
            self._stand_ins[name] = SiteModule(module, kind, comps, config.masks.delta_component)
        # Found once, not per pass: the module walk would otherwise sit on every pass's hot path.
        self.__dict__["_fused"] = fused_equivalents(target, config.train.compile)
        # The output head the masked passes may stop before (losses fuse it with the KL): a plain
        # nn.Linear that get_output_embeddings() names and that is not a site.
        self.__dict__["_head"] = _output_head(target, set(self._stand_ins))
        self._head_batch: Batch | None = None
        # fp32 products through oneDNN (tspd.fastlinear) for the sites, the CI layers and every other
        # linear layer of the target, where train.fp32_matmul says so and they can apply.
        self.set_onednn(self._onednn_possible() and use_onednn(config.train.fp32_matmul))
        self.set_head_onednn(self._head_onednn_measured())
        # Held outside the module tree (like the target), so parameters() never lists the target's.
        self.__dict__["_block_list"], self._block_of, self._branch_of = _find_block_list(target, self.site_names)
        self._block_outputs: list[Any] | None = None
        self._block_batch: Batch | None = None
        self._stackable = True  # every site input has the batch on dim 0 (as `run_target` last saw)
        # Per block holding a site: its direct children's (call start, call end, output) in the
        # target run, for replaying the children a group of passes does not route through.
        self._child_calls: dict[int, dict[str, tuple[int, int, Any]]] = {}
        # Per site, the target run's input, output and inner activations for the batch (and its
        # tensors' versions) in `_site_targets_batch`; dropped once passes have used them.
        self._site_targets: dict[str, SiteTarget] = {}
        self._site_targets_batch: tuple[Batch, list[int] | None] | None = None
        p = next(target.parameters(), None)
        if p is not None:
            self.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)

    # ---- fp32 products ---------------------------------------------------------------------
    def _onednn_possible(self) -> bool:
        """oneDNN's fp32 products can apply: an fp32 target on the CPU, trained without autocast."""
        from tspd.losses import model_device, resolve_autocast

        p = next(self.target.parameters(), None)
        device = model_device(self.target).type
        return (
            onednn_available()
            and device == "cpu"
            and (p is None or p.dtype == torch.float32)
            and resolve_autocast(self.config.train.autocast, device) is None
        )

    @property
    def onednn(self) -> bool:
        """Whether this decomposition's fp32 products go through oneDNN (tspd.fastlinear)."""
        return self.__dict__.get("_onednn", False)

    def set_onednn(self, on: bool) -> None:
        """Use oneDNN's fp32 products (where they can apply) or torch's own. A resumed run takes
        its checkpoint's choice and a data-parallel run rank 0's, as `train.fp32_matmul: auto`
        measures per process."""
        on = bool(on) and self._onednn_possible()
        self.__dict__["_onednn"] = on
        for s in self._stand_ins.values():
            s.onednn = on
        for m in self.ci_fns.modules():
            if hasattr(m, "onednn"):
                m.onednn = on
        self.__dict__["_fast"] = fast_equivalents(self.target, set(self._stand_ins)) if on else []

    @property
    def head_onednn(self) -> bool:
        """Whether the fused output head's products (`train.fuse_head`) go through oneDNN: wherever
        the other products do, and where `train.fp32_matmul: auto` measured them faster at the head's
        own shape (`_head_onednn_measured`)."""
        return self.onednn or self.__dict__.get("_head_onednn", False)

    def set_head_onednn(self, on: bool) -> None:
        """Set the fused head's own oneDNN choice (a resumed run takes its checkpoint's, a
        data-parallel run rank 0's)."""
        self.__dict__["_head_onednn"] = bool(on) and self._onednn_possible()

    def _head_onednn_measured(self) -> bool:
        """`train.fp32_matmul: auto` with the head fused and the other products on torch's route:
        time the head's chunk product both ways (fastlinear.onednn_head_is_faster)."""
        from tspd.losses import Reference, head_fused

        if self.config.train.fp32_matmul != "auto" or self.onednn or self._head is None or not self._onednn_possible():
            return False
        if not head_fused(self):
            return False
        head = self._head[2]
        return onednn_head_is_faster(Reference.head_chunk_rows(head.out_features), head.in_features, head.out_features)

    # ---- the target, temporarily wired to the stand-ins ------------------------------------
    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The target wired to the stand-ins (parameters frozen, eval mode, fast equivalents in
        place), restored on exit. Re-entrant: inside an installation it only resets the stand-ins'
        states on exit (as every exit does), so the stacked forwards of one step share one."""
        if self.__dict__.get("_installed_now"):
            try:
                yield
            finally:
                self._reset_stand_ins()
            return
        target = self.target
        # Only what changes is set and restored (nn.Module attribute writes are slow: this runs a
        # few times per step, and a frozen target in eval mode, the usual case, needs neither).
        thawed = [p for p in target.parameters() if p.requires_grad]
        modes = [(m, m.training) for m in target.modules()]
        swapped = []
        # torch's fused fast path of nn.TransformerEncoderLayer / MultiheadAttention (eval mode,
        # no hooks) reads the layers' weights without calling them: off while tspd stands in, so
        # the target run and every pass take the same, module-calling route.
        try:
            _fastpath_off(True)
            for p in thawed:
                p.requires_grad_(False)
            if any(mode for _, mode in modes):
                target.eval()
            swapped = swap_modules(target, list(self._stand_ins.items())) + swap_in_place(self._fused + self._fast)
            self.__dict__["_installed_now"] = True
            yield
        finally:
            self.__dict__["_installed_now"] = False
            _fastpath_off(False)
            restore_modules(swapped)
            for p in thawed:
                p.requires_grad_(True)
            for m, mode in modes:
                if m.training != mode:
                    m.training = mode
            self._reset_stand_ins()

    def _examples_independent(self, batch: Batch) -> bool:
        """Whether the target treats the examples along dim 0 independently, as stacking passes
        along dim 0 needs: its output for each half of the batch, run alone, must be its output for
        the whole batch (checked once per Decomposition, on the first batch of >= 2 examples). Not
        so for a sequence-first layout (dim 0 is the positions) or batch statistics (e.g. BatchNorm
        without running statistics, a batch-wide softmax): then passes run one by one, said once.
        The three forwards run without the target's module hooks (a caller's hook may hold
        per-batch tensors or count calls); if they fail anyway, stacking stays on."""
        rows = batch_size(batch)
        half = rows // 2
        hooked = [(m, m._forward_hooks, m._forward_pre_hooks) for m in self.target.modules()]
        try:
            for m, _, _ in hooked:
                m.__dict__.update(_forward_hooks=OrderedDict(), _forward_pre_hooks=OrderedDict())
            with torch.no_grad(), self._installed():
                out = call_target(self.target, batch)
                parts = [call_target(self.target, _slice_batch(batch, lo, hi, rows)) for lo, hi in ((0, half), (half, rows))]
        except Exception:
            return True
        finally:
            for m, fwd, pre in hooked:
                m.__dict__.update(_forward_hooks=fwd, _forward_pre_hooks=pre)
        worst = 0.0
        # Per example: the output's entries of each example, whatever its layout ((B, ...), or tokens
        # flattened to (B*T, ...) in example order); a layout that does not split by example fails.
        if out.numel() % rows or any(part.numel() % n for part, n in zip(parts, (half, rows - half))):
            return self._not_independent(float("inf"))
        whole = out.reshape(rows, -1)
        for part, rows_of in zip(parts, (whole[:half], whole[half:])):
            part = part.reshape(rows_of.shape[0], -1)
            if part.shape != rows_of.shape:
                worst = float("inf")
                break
            err = float((part.float() - rows_of.float()).norm() / rows_of.float().norm().clamp_min(1e-30))
            worst = max(worst, err) if err == err else worst  # NaN (a non-finite output): cannot tell, no verdict
        return True if worst <= 1e-2 else self._not_independent(worst)

    @staticmethod
    def _not_independent(worst: float) -> bool:
        warnings.warn(
            f"the target's output for half of the batch, run alone, differs from its output for the whole batch "
            f"(relative difference {worst:.3g}): its examples along dim 0 are not independent (a sequence-first "
            "layout, where dim 0 holds the positions, or batch statistics). tspd runs the masked passes one by one "
            "instead of stacking them along dim 0. A sequence-first model should not use ci.kind attention, which "
            "reads dim 1 as the positions", stacklevel=5)
        return False

    def _check_calls(self) -> None:
        """After the target run: each site's hooks (added since the Decomposition was made) and how
        often it was called. A site called several times per forward (a shared layer) gets its CI
        from the last call's input and applies its masks to every call: refused when the calls'
        inputs differ in shape (the masks cannot fit them all), else said once."""
        for name, s in self._stand_ins.items():
            check_site_hooks(name, s.original)
            st = s.state
            if st.calls > 1 and len(st.shapes) > 1:
                raise SiteError(
                    f"site {name!r} is called {st.calls} times per forward with inputs of shapes "
                    f"{sorted(st.shapes)}: its CI and masks have one shape (from the last call), so they cannot apply "
                    "to every call. Choose a module called once per forward, or give each use its own module")
            warned = self.__dict__.setdefault("_repeat_warned", set())
            if st.calls > 1 and name not in warned:
                warned.add(name)
                warnings.warn(
                    f"site {name!r} is called {st.calls} times per forward (a shared layer): its CI is computed from "
                    "the last call's input and its masks apply to every call", stacklevel=5)

    def _reset_stand_ins(self) -> None:
        # Plain attributes of the stand-ins (no parameter, buffer or module by these names), written
        # as nn.Module.__setattr__ would, without its checks (several times a step).
        for s in self._stand_ins.values():
            s.__dict__.update(state=SiteState(), recorded=None, record=None)

    def component(self, site: str) -> Components:
        if site not in self._stand_ins:
            raise KeyError(f"unknown site {site!r}; sites are {self.site_names}")
        return self.factors[_key(site)]

    def components(self, site: str) -> tuple[Tensor, Tensor]:
        """(U, V) of a site, with W ~ (V U)^T in the target's nn.Linear layout."""
        c = self.component(site)
        return c.U, c.V

    # ---- passes --------------------------------------------------------------------------
    def forget_target_run(self) -> None:
        """Drop what `run_target` recorded for the passes on its batch (block and site values): the
        memory is freed, and passes on that batch recompute what they need."""
        self._block_outputs, self._block_batch, self._child_calls = None, None, {}
        self._head_batch = None
        self._site_targets, self._site_targets_batch = {}, None

    @one_thread_per_target
    def run_target(self, batch: Batch, for_passes: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The target's output and every site's input, without gradients. Also records the outputs
        of the blocks before the last site's block and of the children of site-holding blocks,
        which `run_passes` on this batch replays. `for_passes=False`: the output and the site
        inputs only (what the CI needs), nothing kept for passes."""
        self.forget_target_run()
        independent = None  # whether stacking along dim 0 is sound (None: not known yet)
        if for_passes and self.config.train.stack_passes and batch_size(batch) >= 2:
            if self.__dict__.get("_independent") is None:  # once, before the target run (so that what the model
                self.__dict__["_independent"] = self._examples_independent(batch)  # records in its forward is the run's)
            independent = self.__dict__["_independent"]
        reuse = for_passes and bool(self._block_of) and self.config.train.reuse_prefix
        n_record = max(self._block_of.values()) if reuse else 0
        recorders = [_Record(self._block_list[i]) for i in range(n_record)]
        order: list[int] = []
        calls = _ChildCalls()
        with torch.no_grad(), self._installed():
            for s in self._stand_ins.values():
                s.state = SiteState(mode="record")
            # The call order of every block of the list (not only the recorded ones): a later block
            # called before a recorded one may feed it.
            order_hooks = [
                b.register_forward_pre_hook(lambda *_, i=i: order.append(i)) for i, b in enumerate(self._block_list)
            ] if recorders else []
            if reuse and not torch.is_inference_mode_enabled():  # inference tensors have no version counters
                for j in sorted(set(self._block_of.values())):
                    calls.watch(j, self._block_list[j], {self._branch_of[s] for s, b in self._block_of.items() if b == j})
            swapped = swap_modules(self._block_list, [(f"{i}", r) for i, r in enumerate(recorders)]) if recorders else []
            head_out: list[Any] = []
            head_hook = self._head_module() if for_passes else None
            handle = (
                head_hook.register_forward_hook(lambda _m, _a, o: head_out.append((o, getattr(o, "_version", None))))
                if head_hook is not None and not torch.is_inference_mode_enabled()  # inference tensors have no versions
                else None
            )
            buffers = [] if self.__dict__.get("_buffers_warned") or torch.is_inference_mode_enabled() else [
                b for b in self.target.buffers() if not b.is_inference()]  # (inference tensors have no versions)
            versions = [b._version for b in buffers]
            try:
                out = call_target(self.target, batch)
            finally:
                restore_modules(swapped)
                calls.unwatch()
                for h in order_hooks:
                    h.remove()
                if handle is not None:
                    handle.remove()
            inputs = {n: s.recorded for n, s in self._stand_ins.items()}
            never = [n for n, x in inputs.items() if x is None]
            if never:
                raise SiteError(
                    f"site(s) {', '.join(never)} were never called by the target's forward on this batch: a module "
                    "called only on some inputs (e.g. a mixture-of-experts expert no token reached) cannot be a site, "
                    "nor one whose weight is used directly (e.g. nn.MultiheadAttention's out_proj, or "
                    "F.linear(x, module.weight)), and tspd "
                    "decomposes a site by standing in for its module's call; choose modules the forward calls"
                )
            self._check_calls()
            changed = [i for i, (b, v) in enumerate(zip(buffers, versions)) if b._version != v]
            if changed:
                self.__dict__["_buffers_warned"] = True
                names = [n for n, b in self.target.named_buffers() if any(b is buffers[i] for i in changed)]
                warnings.warn(
                    f"the target changes its buffer(s) {', '.join(names[:5])} in its forward: every forward tspd runs (the "
                    "target run and each pass) changes them again, so passes do not see the state the target run saw and "
                    "decomposing leaves the model changed. Freeze such state (e.g. eval-mode statistics) before decomposing",
                    stacklevel=4)
            if not for_passes:
                return out, inputs
            self._site_targets = {n: s.record for n, s in self._stand_ins.items() if s.record is not None}
            self._site_targets_batch = (batch, _versions(_flat_tensors(batch)))
        # Passes may stop before the head only if the model returned the head's output itself (one
        # call, nothing applied after it, not even in place): then the head's input determines the output.
        sound = len(head_out) == 1 and head_out[0][0] is out and head_out[0][1] == out._version
        self._head_batch = batch if sound else None
        rows = batch_size(batch)
        # Stacked passes concatenate along dim 0: every site must see the batch there (not, e.g.,
        # tokens flattened to (B*T, d) or a sequence-first layout); otherwise passes run one by one.
        self._stackable = all(per_example(x, rows) for x in inputs.values())
        # Replay is sound only for blocks called once each, in order (every block of the list, so
        # none runs before a recorded one), whose recorded outputs are as the block returned them.
        in_order = all(a < b for a, b in zip(order, order[1:])) and order[:n_record] == list(range(n_record))
        if recorders and in_order and all(r.replayable(rows) for r in recorders):
            self._block_outputs, self._block_batch = [r.output for r in recorders], batch
        if self._stackable and independent is not None:
            self._stackable = independent
        if reuse and (not recorders or self._block_outputs is not None):
            self._child_calls, self._block_batch = calls.sound(rows), batch
        return out, inputs

    def ci_logits(self, site_inputs: dict[str, Tensor], keep: Tensor | None = None) -> dict[str, Tensor]:
        """Pre-sigmoid CI logits z (..., C) per site, from the target's site inputs. `keep`: the
        batch's real positions (`position_mask`), so that the attention CI does not attend to padding."""
        z = {}
        for name in self.site_names:
            x = site_inputs[name]
            fn = self.ci_fns[_key(name)]
            if fn.uses_inner or self.site_kinds[name] == "embedding":
                comps = self.factors[_key(name)]
                known = self._site_targets.get(name)
                x = comps.inner(x)
                if known is not None and known.x is site_inputs[name]:
                    known.set_inner(x, comps.V)  # the masked passes' clean segments reuse it (see PassStarts)
            z[name] = fn(x, keep).float()
        return z

    def ci_from_logits(self, z: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(lower, upper) leaky-hard-sigmoid CI: lower for masks, upper for minimality."""
        leak = self.config.ci.leak
        lower = {s: lower_leaky_hard_sigmoid(v, leak) for s, v in z.items()}
        upper = {s: upper_leaky_hard_sigmoid(v, leak) for s, v in z.items()}
        return lower, upper

    @one_thread_per_target
    @torch.no_grad()
    def causal_importance(self, batch: Batch) -> dict[str, Tensor]:
        """CI per site, shape (batch, positions, C) (or (batch, C) without positions), in [0, 1];
        0 at the padded positions of a batch with an attention_mask (they are no input)."""
        _, inputs = self.run_target(batch, for_passes=False)
        keep = position_mask(batch)
        lower, _ = self.ci_from_logits(self.ci_logits(inputs, keep))
        if keep is None or bool(keep.all()):
            return lower
        def pads_zero(g: Tensor) -> Tensor:
            if g.shape[:-1] == keep.shape:
                return g.masked_fill(~keep[..., None], 0.0)
            if g.dim() == 2 and g.shape[0] == keep.numel():  # a site that sees the tokens flattened, (B*T, d)
                return g.masked_fill(~keep.reshape(-1, 1), 0.0)
            return g

        return {s: pads_zero(g) for s, g in lower.items()}

    @one_thread_per_target
    def run_pass(self, batch: Batch, p: Pass) -> Tensor:
        """One masked forward of the target (gradients flow to components and masks)."""
        try:
            return self._run_stacked(batch, [p], skip_blocks=0)
        finally:
            self._drop_site_targets()

    def _drop_site_targets(self) -> None:
        """Forget the target run's site values once passes have run: no memory held past the step,
        and no x V whose graph a backward has freed is offered to a later pass."""
        self._site_targets, self._site_targets_batch = {}, None

    def run_passes(self, batch: Batch, passes: list[Pass], stack: bool = True, defer_head: bool = False):
        """Several masked passes. With `stack`, passes run as one forward over the batch repeated,
        grouped by where they first route: a group whose first routed site sits in child c of
        block j replays the target's outputs of blocks 0..j-1, and of block j's children that
        finished before c started, instead of recomputing them.

        `defer_head`: return (outputs, head) where, if `head` is not None, the outputs are the
        inputs of the output head `head` (an nn.Linear) and the caller applies it (the losses fuse
        it with the KL). That needs `run_target` on this very batch to have found the model's
        output to be the head's; otherwise head is None and the outputs are the model's."""
        groups, head = self.run_pass_groups(batch, passes, stack, defer_head)
        outs: list[Tensor | None] = [None] * len(passes)
        for idxs, out in groups:
            for i, o in zip(idxs, out.chunk(len(idxs), dim=0) if len(idxs) > 1 else [out]):
                outs[i] = o
        return (outs, head) if defer_head else outs

    @one_thread_per_target
    def run_pass_groups(
        self, batch: Batch, passes: list[Pass], stack: bool = True, defer_head: bool = False
    ) -> tuple[list[tuple[list[int], Tensor]], nn.Linear | None]:
        """`run_passes` without splitting the stacked outputs: ([(indices, output)], head), where
        `output` holds the outputs of passes `indices` one after the other along dim 0 (a loss
        computed on it per pass needs no concatenation of the passes' gradients in the backward).
        `head` as for `run_passes(..., defer_head=True)`; None without `defer_head`."""
        ok = defer_head and self._head is not None and self._head_batch is batch and self._head_module() is not None
        if stack and len(passes) > 1 and self.__dict__.get("_independent") is None and batch_size(batch) >= 2:
            # passes asked for without a target run that checked it (e.g. after causal_importance only)
            self.__dict__["_independent"] = self._examples_independent(batch)
        stack = stack and self.__dict__.get("_independent") is not False
        try:
            return self._run_groups(batch, passes, stack, ok), (self._head[2] if ok else None)
        finally:
            self._drop_site_targets()

    @property
    def output_head(self) -> nn.Linear | None:
        """The target's output head the masked passes can stop before (see `run_passes`), if any."""
        return self._head[2] if self._head is not None else None

    def apply_head(self, h: Tensor) -> Tensor:
        """The output head on its inputs `h` (from `run_passes(..., defer_head=True)`), through
        oneDNN where the passes' own linear layers run through it. The head's weights are frozen
        here as in the passes: no gradient reaches them (GPT-2's is its token embedding)."""
        head = self._head[2]
        b = head.bias.detach() if head.bias is not None else None
        return linear(h, head.weight.detach().t(), b, self.onednn)

    def _head_module(self) -> nn.Module | None:
        """What stands at the output head's place now: the head or its FastLinear stand-in (None
        if there is no head or someone else's module stands there, e.g. a wrapper)."""
        if self._head is None:
            return None
        parent, child, head = self._head
        m = parent._modules.get(child)
        ours = m is head or (isinstance(m, FastLinear) and m.original is head)
        return m if ours and untouched(head) else None

    def _run_groups(self, batch: Batch, passes: list[Pass], stack: bool, stop_at_head: bool) -> list[tuple[list[int], Tensor]]:
        with self._installed():  # one installation for all the stacked forwards (see _installed)
            return self._group_outputs(batch, passes, stack, stop_at_head)

    def _group_outputs(self, batch: Batch, passes: list[Pass], stack: bool, stop_at_head: bool) -> list[tuple[list[int], Tensor]]:
        if not stack or not self._stackable or (len(passes) == 1 and self._block_batch is not batch):
            return [([i], self._run_stacked(batch, [p], skip_blocks=0, stop_at_head=stop_at_head)) for i, p in enumerate(passes)]
        groups: dict[tuple[int, int], list[int]] = {}
        replayable = self._block_batch is batch  # block outputs were recorded for this very batch
        for i, p in enumerate(passes):
            groups.setdefault(self._start_of(p) if replayable else (0, -1), []).append(i)
        return [
            (idxs, self._run_stacked(batch, [passes[i] for i in idxs], skip_blocks=j, skip_before=start, stop_at_head=stop_at_head))
            for (j, start), idxs in groups.items()
        ]

    def _start_of(self, p: Pass) -> tuple[int, int]:
        """Where a pass can start: (j, t) with j the first block (of the target's block list) any
        site of `p` is routed in, and t the call-order time at which the child of block j holding
        the first such site starts (children of block j that ended before t are replayed); t = -1
        replays no child. (0, -1) when the target has no block list or the pass routes nothing."""
        if not self._block_of:
            return (0, -1)
        routed = [s for s in p.masks if self._routes_anywhere(p, s)]
        if not routed:
            return (0, -1)
        j = min(self._block_of[s] for s in routed)
        calls = self._child_calls.get(j)
        if not calls:
            return (j, -1)
        starts = [calls[self._branch_of[s]][0] for s in routed if self._block_of[s] == j and self._branch_of[s] in calls]
        if len(starts) < sum(self._block_of[s] == j for s in routed):
            return (j, -1)  # a routed child of block j was not recorded soundly: replay none
        return (j, min(starts))

    @staticmethod
    def _routes_anywhere(p: Pass, site: str) -> bool:
        r = p.routed.get(site)
        return r is None or bool(r.any())

    def _run_stacked(
        self, batch: Batch, passes: list[Pass], skip_blocks: int, skip_before: int = -1, stop_at_head: bool = False
    ) -> Tensor:
        n = len(passes)
        rows = batch_size(batch)
        # Where each pass's first masked segment ran (see PassStarts). Off for a single pass (its
        # input requires grad only through what the caller brought in, and run_pass callers --
        # adversarial search, attribution -- keep every path), when the inputs require grad (a
        # caller differentiating with respect to them) and in inference mode (no version counters).
        off = n == 1 or torch.is_inference_mode_enabled() or any(t.requires_grad for t in _flat_tensors(batch))
        starts = None if off else PassStarts(n)
        recorded = self._site_targets_batch
        same_batch = recorded is not None and recorded[0] is batch and recorded[1] == _versions(_flat_tensors(batch))
        known = self._site_targets if starts is not None and same_batch else {}
        with self._installed():
            for name, s in self._stand_ins.items():
                segments: list[Segment] = []
                for i, p in enumerate(passes):
                    if name in p.masks:
                        seg = Segment(rows, p.masks[name], p.routed.get(name), p.delta.get(name), pass_index=i)
                    else:
                        seg = Segment(rows)
                    if segments and seg.masks is None and segments[-1].masks is None:
                        segments[-1].rows += rows  # merge neighbouring target-weight segments
                    else:
                        segments.append(seg)
                s.state = SiteState("masked", segments, starts, known.get(name))
            replaced = self._replay_blocks(skip_blocks, n) + self._replay_children(skip_blocks, skip_before, n)
            if stop_at_head:
                parent, child, _ = self._head
                replaced.append((parent, child, parent._modules[child]))
                parent._modules[child] = _HeadInput(self._head[2])
            try:
                out = call_target(self.target, repeat_batch(batch, n))
            finally:
                restore_modules(replaced)
            skipped = [name for name, s in self._stand_ins.items() if s.state.calls == 0
                       and any(seg.masks is not None and (seg.routed is None or bool(seg.routed.any())) for seg in s.state.segments)]
            if skipped:
                raise SiteError(
                    f"site(s) {', '.join(skipped)} were called in the target run but not in a masked pass, so their masks "
                    "were never applied: the model takes another route when tspd stands in for its modules (e.g. a fused "
                    "kernel that reads the weights directly when no hook is attached). Make the model call these modules on "
                    "every forward, or choose other sites")
            return out

    def _replay_blocks(self, count: int, n: int) -> list[tuple[nn.Module, str, nn.Module]]:
        """Swap blocks 0..count-1 for modules returning the target run's recorded outputs."""
        if count == 0:
            return []
        if self._block_outputs is None or len(self._block_outputs) < count:
            raise RuntimeError("block outputs were not recorded: call run_target on this batch first")
        replay = [(f"{i}", _Replay(self._block_list[i], self._block_outputs[i], n)) for i in range(count)]
        return swap_modules(self._block_list, replay)

    def _replay_children(self, j: int, before: int, n: int) -> list[tuple[nn.Module, str, nn.Module]]:
        """Swap the children of block j whose target-run call ended before time `before` for
        modules returning their recorded outputs (e.g. the attention before an MLP site)."""
        calls = self._child_calls.get(j) if before >= 0 else None
        if not calls:
            return []
        block = self._block_list[j]
        done = [
            (name, _Replay(block._modules[name], out, n)) for name, (_, end, out) in calls.items() if end < before and out is not None
        ]
        return swap_modules(self._block_list[j], done) if done else []

    def ones_pass(self, ci: dict[str, Tensor]) -> Pass:
        """Every subcomponent fully on (mask 1), delta fully on: the decomposed model's own output."""
        masks = {s: torch.ones_like(g) for s, g in ci.items()}
        delta = {s: torch.ones_like(g[..., 0]) for s, g in ci.items()} if self.config.masks.delta_component else {}
        return Pass(masks=masks, delta=delta)

    @one_thread_per_target
    def forward_with_ablation(
        self,
        batch: Batch,
        ablate: dict[str, list[int]],
        positions: list[int] | Tensor | None = None,
        base: str = "ones",
    ) -> Tensor:
        """Run the target with chosen subcomponents set to mask 0 at chosen positions (None: all;
        a list of positions for every example, counted among each row's real tokens when the batch
        has an attention_mask with padding ([-1]: each row's last real token, as output.positions);
        or a bool (batch, positions) tensor per example).

        base='ones' keeps every other subcomponent at mask 1; base='ci' uses the CI as mask.
        Example: `dec.forward_with_ablation(tokens, {"blocks.0.attn.k_proj": [3]}, positions=[-1])`
        """
        for s in ablate:
            self.component(s)
        keep = position_mask(batch)
        if keep is not None and positions is not None and not isinstance(positions, Tensor) and not bool(keep.all()):
            from tspd.losses import real_positions

            T = keep.shape[1]
            bad = [q for q in positions if not -T <= q < T]
            if bad:
                raise IndexError(f"positions {bad} out of range for a batch of {T} positions")
            idx, valid = real_positions(keep, list(positions))
            where = torch.zeros_like(keep)
            where[torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(idx)[valid], idx[valid]] = True
            positions = where
        try:
            with torch.no_grad():
                _, inputs = self.run_target(batch)
                ci, _ = self.ci_from_logits(self.ci_logits(inputs, keep))
                return self.run_pass(batch, self.ablation_pass(ci, ablate, positions, base))
        finally:
            self.forget_target_run()

    def ablation_pass(
        self,
        ci: dict[str, Tensor],
        ablate: dict[str, list[int]],
        positions: list[int] | Tensor | None = None,
        base: str = "ones",
    ) -> Pass:
        """The pass `forward_with_ablation` runs, built from the batch's CI (see there)."""
        p = self.ones_pass(ci)
        if base == "ci":
            p.masks = {s: g.clone() for s, g in ci.items()}
        elif base != "ones":
            raise ValueError(f"base must be 'ones' or 'ci', got {base!r}")
        where = positions if isinstance(positions, Tensor) and positions.dtype == torch.bool else None
        for s, idx in ablate.items():
            m = p.masks[s]
            if positions is None:
                m[..., idx] = 0.0
            elif where is not None:
                if where.shape != m.shape[:-1]:
                    raise ValueError(f"positions mask has shape {tuple(where.shape)}; site {s} needs {tuple(m.shape[:-1])}")
                m[..., idx] = m[..., idx].masked_fill(where[..., None], 0.0)
            else:
                if m.dim() < 3:
                    raise ValueError(f"site {s} has no position dimension; pass positions=None")
                pos = torch.as_tensor(positions)
                sel = m[:, pos]
                sel[..., idx] = 0.0
                m[:, pos] = sel
        return p

    # ---- losses that need only parameters -------------------------------------------------
    def faithfulness(self) -> Tensor:
        """Mean over every decomposed entry of (W - (V U)^T)^2."""
        total, count = 0.0, 0
        for name in self.site_names:
            s = self._stand_ins[name]
            w = target_weight(s.original, s.kind).detach()
            diff = w - self.factors[_key(name)].weight()
            total = total + diff.pow(2).sum()
            count += diff.numel()
        return total / count

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path, target: bool = True) -> Path:
        """Write config.yaml, decomposition.safetensors and (`target`) the target (atomically, file by file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "config.yaml", lambda p: Path(p).write_text(self.config.to_yaml()))
        save_state(self, directory / "decomposition.safetensors")
        from tspd.targets import saved_with_run

        if target and self.config.target is not None:
            if saved_with_run(self.config.target):
                save_state(self.target, directory / "target.safetensors")
            else:  # rebuilt from the config on load: what it must equal
                first = next(self.target.parameters(), None)
                write_json(directory / TARGET_FINGERPRINT, {"sha256": target_fingerprint(self.target),
                                                            "dtype": None if first is None else str(first.dtype)})
        elif target:
            atomic_write_bytes(directory / "target_module.pt", lambda p: torch.save(self.target, p))
        return directory


class _HeadInput(StandIn):
    """Stands in for the output head: returns the head's input, which the caller then feeds to
    the head itself (fused with the loss)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _output_head(target: nn.Module, sites: set[str]) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, child name, head) for the target's output head as `get_output_embeddings()`
    names it, if that is a plain nn.Linear that is not a site; else None."""
    get = getattr(target, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return None
    name = next((n for n, m in target.named_modules() if m is head), None)
    if not name or name in sites:
        return None
    return (*slot(target, name), head)


class _Record(StandIn):
    """Wraps a block during the target run and keeps its output, with what `replayable` needs to
    judge it: whether the call modified its inputs in place, and its output's versions then."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        self.output: Any = None
        self.clean = False
        self.out_versions: list[int] | None = None

    def forward(self, *args, **kwargs):
        inputs = _flat_tensors((args, kwargs))
        before = _versions(inputs)
        self.output = self.original(*args, **kwargs)
        self.clean = before is not None and _versions(inputs) == before
        self.out_versions = _versions(_flat_tensors(self.output))
        return self.output

    def replayable(self, rows: int) -> bool:
        """Whether the recorded output may stand in for the block: the call left its inputs as they
        were and the output passes `_replayable_output`."""
        return self.clean and _replayable_output(self.output, self.out_versions, rows)


class _Replay(StandIn):
    """Stands in for a block (or a block's child) upstream of every routed site: returns the
    target run's output, repeated for the stacked passes."""

    def __init__(self, original: nn.Module, output: Any, n: int):
        super().__init__(original)
        self.output, self.n = output, n

    def forward(self, *args, **kwargs):
        # A copy even for n = 1: the recorded output is replayed again by later groups, so a
        # downstream in-place op must never reach it.
        def copy(o):
            return repeat_batch(o, self.n) if self.n > 1 else o.clone()

        if isinstance(self.output, tuple):
            return tuple(copy(o) if isinstance(o, Tensor) else o for o in self.output)
        return copy(self.output)


def _find_block_list(target: nn.Module, sites: list[str]) -> tuple[nn.ModuleList | None, dict[str, int], dict[str, str]]:
    """The ModuleList of blocks holding every site (e.g. `transformer.h`, `model.layers`), each
    site's block index and the block's direct child holding it (`mlp` for `transformer.h.0.mlp.c_fc`);
    (None, {}, {}) when no single list holds them all."""
    for name, module in target.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        prefix = f"{name}." if name else ""
        block_of, branch_of = {}, {}
        for s in sites:
            parts = s[len(prefix):].split(".") if s.startswith(prefix) else [""]
            if parts[0].isdigit() and len(parts) > 1:  # inside a block (a site that is a block is not)
                block_of[s] = int(parts[0])
                branch_of[s] = parts[1] if len(parts) > 1 else ""
        if len(block_of) == len(sites):
            return module, block_of, branch_of
    return None, {}, {}


class _ChildCalls:
    """Forward hooks on the direct children of chosen blocks during the target run: each child's
    call start and end on one clock, and its output. `sound(rows)` keeps what may be replayed: a
    child called exactly once, that did not modify its inputs in place, whose outputs (a tensor or
    a flat tuple of tensors and non-tensors) have `rows` as their first dimension and were not
    modified in place afterwards, and that ended before the last site-holding child of its block
    started (nothing later is ever replayed)."""

    def __init__(self):
        self.clock = 0
        self.calls: dict[int, dict[str, dict]] = {}
        self.branches: dict[int, set[str]] = {}
        self.handles: list[Any] = []

    def watch(self, j: int, block: nn.Module, branches: set[str]) -> None:
        rec: dict[str, dict] = {}
        self.calls[j] = rec
        for name, child in block.named_children():
            def pre(_m, args, kwargs, name=name):
                entry = rec.setdefault(name, {"count": 0})
                entry["count"] += 1
                entry["start"] = self.tick()
                entry["inputs"] = _flat_tensors((args, kwargs))
                entry["in_versions"] = _versions(entry["inputs"])

            def post(_m, _args, _kwargs, out, name=name):
                entry = rec[name]
                entry["end"], entry["output"] = self.tick(), out
                entry["out_versions"] = _versions(_flat_tensors(out))
                entry["clean"] = entry["in_versions"] is not None and _versions(entry["inputs"]) == entry["in_versions"]
                del entry["inputs"]

            self.handles += [
                child.register_forward_pre_hook(pre, with_kwargs=True),
                child.register_forward_hook(post, with_kwargs=True),
            ]
        self.branches[j] = branches

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def unwatch(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def sound(self, rows: int) -> dict[int, dict[str, tuple[int, int, Any]]]:
        out = {}
        for j, rec in self.calls.items():
            starts = [rec[b]["start"] for b in self.branches[j] if b in rec]
            last = max(starts) if starts else -1
            keep = {}
            for name, e in rec.items():
                if e["count"] != 1 or "end" not in e:
                    continue
                output = e["output"]
                replayable = e["clean"] and e["end"] < last and _replayable_output(output, e["out_versions"], rows)
                # (start, end, output); output None: the call times are known but it is never replayed.
                keep[name] = (e["start"], e["end"], output if replayable else None)
            out[j] = keep
        return out


def _replayable_output(output: Any, versions: list[int] | None, rows: int) -> bool:
    """Whether a recorded block or child output may be replayed: a tensor or a flat tuple whose
    tensors all have `rows` first, each unchanged since its `versions` were taken."""
    flat = _flat_tensors(output)
    return (
        versions is not None
        and (isinstance(output, Tensor) or (isinstance(output, tuple) and not any(isinstance(o, (tuple, list, dict)) for o in output)))
        and all(t.dim() > 0 and t.shape[0] == rows for t in flat)
        and _versions(flat) == versions
    )


def _flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def _versions(tensors: list[Tensor]) -> list[int] | None:
    """Version counters; None where a tensor has none (inference-mode tensors)."""
    if any(t.is_inference() for t in tensors):
        return None
    return [t._version for t in tensors]


TARGET_FINGERPRINT = "target_fingerprint.json"


def target_fingerprint(target: nn.Module) -> str:
    """sha256 over the target's state (names, dtypes, shapes and bytes, in order): a Hugging Face
    target is not saved with a run but rebuilt from the config on load, and must be the same model."""
    h = hashlib.sha256()
    for k, v in target.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_target_matches_config(target: nn.Module, config: RunConfig) -> None:
    """For a config whose `target` describes a toy model (saved with the run, rebuilt from the config
    on load): the given module must have the state names and shapes that config builds, else the
    saved run could not be loaded. Raises ValueError naming the first difference."""
    from tspd.targets import build_target, saved_with_run

    if config.target is None or not saved_with_run(config.target):
        return
    want = {k: tuple(v.shape) for k, v in build_target(config.target, train=False).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if want != have:
        diff = next((f"{k}: {have.get(k)} in the model, {want.get(k)} by the config"
                     for k in list(want) + list(have) if want.get(k) != have.get(k)))
        raise ValueError(f"config.target ({config.target.kind}) does not describe the model given ({diff}): "
                         "drop `target` from the config (the model is then saved with the run), or make it match")


def load(directory: str | Path, target: nn.Module | None = None) -> Decomposition:
    """Load a saved Decomposition. `target` overrides the saved target (it must have the same sites).

    Example: `dec = tspd.load("runs/tms-5-2")`
    """
    from tspd.targets import build_target, saved_with_run

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist (or is not a folder): give a tspd run folder")
    if not (directory / "decomposition.safetensors").exists():
        if (directory / "checkpoint.pt").exists():
            raise FileNotFoundError(f"{directory} holds a checkpoint but no decomposition.safetensors: the run has not "
                                    "finished; finish it with the same command and --resume")
        earlier = sorted(p.name for p in directory.glob("previous-*") if (p / "decomposition.safetensors").exists())
        if earlier:
            raise FileNotFoundError(
                f"{directory} holds no decomposition.safetensors (a run started there did not finish); the earlier "
                f"finished run was set aside in {directory / earlier[-1]}: load that folder"
                + (f" ({len(earlier)} such folders)" if len(earlier) > 1 else ""))
        raise FileNotFoundError(f"{directory} holds no decomposition.safetensors: is it a tspd run folder?")
    config = RunConfig.from_yaml(directory / "config.yaml")
    if target is None:
        if config.target is not None:
            target = build_target(config.target, train=False)
            if saved_with_run(config.target):
                target.load_state_dict(_read_safetensors(directory / "target.safetensors"))
            elif (directory / TARGET_FINGERPRINT).exists():
                saved = json.loads((directory / TARGET_FINGERPRINT).read_text()).get("sha256")
                if saved != target_fingerprint(target):
                    raise ValueError(
                        f"the target rebuilt from {directory / 'config.yaml'} (target.model {config.target.model!r}) is "
                        "not the model this decomposition was trained on (their weights differ): pass that model, "
                        "tspd.load(directory, target=model)"
                    )
        elif (directory / "target_module.pt").exists():
            target = torch.load(directory / "target_module.pt", weights_only=False)
        else:
            raise FileNotFoundError(f"{directory} has no saved target; pass load(directory, target=model)")
    else:
        _warn_if_not_the_trained_target(directory, target)
    dec = Decomposition(target, config)
    dec.load_state_dict(_read_safetensors(directory / "decomposition.safetensors"))
    return dec


def _warn_if_not_the_trained_target(directory: Path, target: nn.Module) -> None:
    """A target passed to `load` whose weights differ from those the run recorded (target_fingerprint.json)
    is the caller's choice, but said: with the delta component, every mask 1 reproduces any model, so
    nothing downstream would show it. Not when its dtype differs (the fingerprint hashes the bytes)."""
    path = directory / TARGET_FINGERPRINT
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        dtype = saved.get("dtype")
    except (OSError, ValueError, AttributeError):
        return
    p = next(target.parameters(), None)
    # Another dtype than the run's cannot be told apart (the bytes differ); a file from before the dtype
    # was recorded is compared for an fp32 model only.
    if p is None or str(p.dtype) != (dtype or str(torch.float32)):
        return
    if saved.get("sha256") != target_fingerprint(target):
        warnings.warn(
            f"the target passed to tspd.load({str(directory)!r}) has other weights than the model this decomposition was "
            f"trained on ({path.name}): its components describe that model's weights, not these", stacklevel=3)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """A run folder's .safetensors file, or an error naming it if it cannot be read."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run folder is incomplete; run it again")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' SafetensorError derives from Exception only
        raise unreadable(path, e, "Run the decomposition again (with --resume if its checkpoint is intact)") from e
