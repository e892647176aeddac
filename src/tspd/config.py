"""One validated run config: YAML in and out, dotted overrides, unknown keys rejected.

Example:
    >>> from tspd.config import RunConfig
    >>> cfg = RunConfig.model_validate({"sites": [{"pattern": "linear1", "C": 20}]})
    >>> cfg = cfg.with_overrides(["train.steps=10", "losses.faithfulness=2"])
    >>> cfg.train.steps
    10
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config could not be read or is invalid; the message names the key and the fix."""


class Strict(BaseModel):
    # inf is refused like NaN: a coefficient or rate of inf diverges at the first step (null is "no limit")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED = {"ge": -(2**63), "lt": 2**63}  # what torch.manual_seed takes


class SiteConfig(Strict):
    pattern: str = Field(description="glob over module paths, e.g. 'transformer.h.*.mlp.c_fc'")
    C: int = Field(gt=0, description="number of rank-1 subcomponents for every site it matches")


class AttentionCIConfig(Strict):
    d_attn: int = Field(16, gt=0, description="width of the CI attention's queries, keys and values")
    max_len: int = Field(512, gt=0, description="longest sequence the CI attention accepts (sizes the position tables)")
    pos_emb: bool = Field(True, description="learned absolute position embedding p_j added to the site input")
    head: Literal["vector_mlp", "shared_mlp"] = Field(
        "vector_mlp", description="maps concat(a_n, x_n + p_n) to C logits: per-subcomponent MLPs or one shared MLP"
    )


class CIConfig(Strict):
    kind: Literal["mlp", "vector_mlp", "shared_mlp", "attention"] = Field(
        "mlp", description="causal-importance function (SPEC §3)"
    )
    hidden: list[int] = Field([16], description="hidden widths of the CI MLPs (mlp, vector_mlp and attention use the first only)")
    leak: float = Field(0.01, ge=0, description="leak of both hard sigmoids")
    attention: AttentionCIConfig = Field(default_factory=AttentionCIConfig, description="settings of the attention kind")


    @field_validator("hidden")
    @classmethod
    def _widths_positive(cls, v: list[int]) -> list[int]:
        if any(w <= 0 for w in v):
            raise ValueError("every hidden width must be > 0, e.g. ci.hidden=[16]")
        return v


class MaskConfig(Strict):
    kind: Literal["continuous", "binomial"] = Field("continuous", description="r ~ U(0,1) or Bernoulli(0.5) in m = g + (1-g) r")
    n_samples: int = Field(1, gt=0, description="mask samples per stochastic loss term per step")
    subset_granularity: Literal["per_batch", "per_example", "per_position"] = Field(
        "per_example", description="how often subset (partial) routing draws a new subset of sites"
    )
    delta_component: bool = Field(False, description="add W - (VU)^T with its own stochastic mask per position")


class LossConfig(Strict):
    faithfulness: float = Field(1.0, ge=0, description="coefficient of mean (W - (VU)^T)^2")
    stochastic_recon: float = Field(1.0, ge=0, description="coefficient of D with stochastic masks on every site")
    stochastic_recon_layerwise: float = Field(1.0, ge=0, description="coefficient of mean over sites of D with one site masked")
    stochastic_recon_subset: float = Field(0.0, ge=0, description="coefficient of D with a random subset of sites masked")
    ci_masked_recon: float = Field(0.0, ge=0, description="coefficient of D with mask = CI, every site")
    importance_minimality: float = Field(3e-3, ge=0, description="coefficient of sum_sites sum_c mean (g_upper + eps)^p")
    adversarial_recon: float = Field(0.0, ge=0, description="coefficient of D under sign-gradient-ascent masks")


class MinimalityConfig(Strict):
    p_start: float = Field(1.0, gt=0, description="exponent p at the start of the anneal")
    p_end: float | None = Field(None, gt=0, description="exponent p at the end of the anneal (None: constant p_start)")
    anneal_start_frac: float = Field(0.0, ge=0, le=1, description="fraction of training where p starts moving")
    anneal_end_frac: float = Field(1.0, ge=0, le=1, description="fraction of training where p reaches p_end")
    eps: float = Field(1e-12, gt=0, description="epsilon in (g + eps)^p (> 0: the gradient of g^p at g = 0 is infinite for p < 1)")


class AdversarialConfig(Strict):
    n_steps: int = Field(3, ge=1, description="sign-gradient ascent steps on the adversarial sources a")
    step_size: float = Field(0.2, gt=0, description="ascent step on a (a stays in [0, 1])")


class OutputConfig(Strict):
    divergence: Literal["kl", "mse"] = Field("kl", description="KL(target || masked) over the last dim, or MSE")
    positions: list[int] | None = Field(None, description="restrict D to these positions (dim 1), e.g. [-1]; None: all")


class TrainConfig(Strict):
    steps: int = Field(1000, ge=0, description="optimisation steps")
    batch_size: int = Field(256, gt=0, description="examples per step (the data source is asked for this many)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="optimiser over U, V and CI parameters")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (only with train.optimizer: adamw)")
    warmup_frac: float = Field(0.0, ge=0, le=1, description="fraction of steps of linear lr warm-up")
    final_lr_frac: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * final_lr_frac; 1.0 means constant")
    grad_clip: float | None = Field(None, gt=0, description="clip the global grad norm to this (None: off)")
    faithfulness_warmup_steps: int = Field(0, ge=0, description="steps on faithfulness alone before training (fits VU to W)")
    faithfulness_warmup_lr: float = Field(1e-2, gt=0, description="lr of the faithfulness warm-up")
    log_every: int = Field(50, gt=0, description="write a metrics line every N steps")
    eval_every: int = Field(500, gt=0, description="evaluate every N steps (and at the end)")
    eval_batches: int = Field(4, gt=0, description="batches per evaluation")
    checkpoint_every: int = Field(500, gt=0, description="write a resumable checkpoint every N steps (and at the end)")
    stack_passes: bool = Field(True, description="run passes that differ only in masks/routing as one batched forward")
    reuse_prefix: bool = Field(
        True,
        description="masked passes replay the target's outputs of the blocks (and of the block's children, e.g. the "
        "attention before an MLP site) before their first routed site",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads per process (None: torch's default). Do not run two multi-threaded jobs on "
        "the same cores: a facts decomposition went from 1.7 to ~18 s per step while a `facts ablate` shared its 2 cores "
        "(measured 2026-12-01); run them one after the other (pausing one with `kill -STOP` / `kill -CONT` works; a "
        "checkpointed run can also be stopped and `--resume`d)")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where the CLI puts the target and the decomposition (under torchrun, cuda = the rank's local GPU)"
    )
    autocast: Literal["bf16", "auto"] | None = Field(
        None,
        description="run the target and masked passes under bf16 autocast (CPU or GPU); `auto`: bf16 where it is fast "
        "(a GPU with bf16; a CPU whose bf16 matmuls measure ≥ 1.5× faster than fp32 in a 0.1-1-s test at start-up: a "
        "2-core AMD EPYC with AVX512-BF16 ran 850 vs 195 GFLOP/s, a 2-core Xeon with AVX512-BF16 but no AMX 164 vs 305, "
        "i.e. *slower*; a resumed run keeps the checkpoint's choice), else the target's dtype; None: the target's dtype",
    )
    fuse_head: bool | Literal["auto"] = Field(
        "auto",
        description="the stacked masked passes stop before the output head (a plain nn.Linear that `get_output_embeddings()` "
        "names and the model's output comes straight from) and the loss runs the head, log-softmax and KL together over "
        "chunks of rows, with the gradient formed on the way: no (tokens x vocab) logits kept for the backward (SmolLM2: "
        "3.1-3.6 vs 4.1 GB peak RSS at the same speed). KL divergence only; other heads run unchanged. `auto`: for "
        "heads of >= 8192 outputs (at vocab 1024 it measured 1-4 % slower)",
    )
    fp32_matmul: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="CPU fp32 products of the target's linear layers, the components and the sites: `onednn` through "
        "oneDNN's kernels (tspd.fastlinear; IEEE fp32, another summation order), `torch` torch's own (MKL on x86), "
        "`auto` oneDNN where a ~0.1-s test at start-up measures a layer's forward product and weight gradient >= 1.3x "
        "faster through it (a 2-core AMD EPYC Zen 5, where MKL runs its AVX2 kernels: ~430 vs ~200 GFLOP/s forward; not "
        "a 2-core AMD EPYC Zen 3, AVX2 only: equal forward, oneDNN's weight gradient half as fast); where that picks "
        "torch's, a fused output head (`train.fuse_head`) gets its own ~0.3-s test at its chunk shape, oneDNN if >= 1.15x "
        "faster (the Zen 3 ran SmolLM2's head chunk 1.4-1.55x faster through oneDNN). Ignored under autocast and on GPUs",
    )
    compile: bool = Field(
        False,
        description="fuse the step's elementwise chains into one loop each way instead of several ops: the reconstruction "
        "KL, each site's CI sigmoids with its minimality term and, in passes with gradients, GPT-2's tanh GELU (torch.compile; "
        "on the CPU the KL and the CI chain's forward as tspd.native's C loops; equal to eager to fp32 rounding; first steps "
        "compile: seconds; CPU needs a C++ compiler)",
    )


class EvalConfig(Strict):
    active_threshold: float = Field(0.5, ge=0, le=1, description="a subcomponent is active where CI > this (L0)")
    alive_threshold: float = Field(0.1, ge=0, le=1, description="alive: CI > this on some evaluated input")


class ConsolidateConfig(Strict):
    at_frac: list[float] = Field(
        default_factory=list,
        description="fractions of train.steps at which co-active subcomponents are merged into fewer rank-1 pieces "
        "(tspd.consolidate; a tspd addition, not in the SPD papers); 1.0: after the last step (the final checkpoint is "
        "from before it; a resumed finished run redoes it), ending with every piece "
        "whose CI is 0 on all merge batches switched off for good; empty: never",
    )

    @field_validator("at_frac")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"consolidate.at_frac needs fractions of training in (0, 1] (1: after the last step), got {bad}")
        return v

    def steps(self, total: int) -> set[int]:
        """The training steps (0-based, at least 1) before which the merges happen; `total` (from
        at_frac 1.0): after the last step."""
        return {total if f == 1 else min(max(round(f * total), 1), max(total - 1, 1)) for f in self.at_frac}

    tol: float = Field(0.05, gt=0, lt=1, description="largest relative output error (95th percentile over a group's inputs) the merged pieces may leave")
    overlap: float = Field(
        0.9, gt=0, le=1, description="a piece joins a group when this share of its active inputs lies in the group's"
    )
    batches: int | None = Field(
        None, gt=0,
        description="held-out batches of the data source the merges are judged on (a callable source's steps −1, "
        "−2, …, never trained on); more catch rarely active pieces; `None`: the `train.eval_batches` evaluation batches",
    )
    max_increase: float | None = Field(
        None, gt=0,
        description="choose each group's rank by function: the smallest whose merge raises the CI-masked divergence "
        "on the merge batches (`consolidate.batches`) by at most this, over the group's pieces all on wherever any of "
        "them is (None: by tol)",
    )
    prune: float | None = Field(
        None, gt=0,
        description="after the merges, switch off (lower the CI function's last bias of) each piece whose removal "
        "raises the CI-masked divergence on the merge batches by at most this: per site, the never-active pieces (CI "
        "in (0, threshold]) together, else one by one, then the active ones from the least often active; `None`: never",
    )


class TMSTargetConfig(Strict):
    kind: Literal["tms"] = "tms"
    n_features: int = Field(5, gt=0, description="number of sparse input features")
    d_hidden: int = Field(2, gt=0, description="width of the bottleneck")
    feature_probability: float = Field(0.05, gt=0, le=1, description="probability each feature is present")
    train_steps: int = Field(5000, ge=0, description="training steps of the target")
    train_batch_size: int = Field(1024, gt=0, description="batch of the target's training")
    train_lr: float = Field(5e-3, gt=0, description="AdamW lr of the target's training")
    seed: int = Field(0, **SEED, description="seed of the target's init and training data")


class TMSDataConfig(Strict):
    kind: Literal["tms"] = "tms"
    feature_probability: float = Field(0.05, gt=0, le=1, description="probability each feature is present")


class InductionTargetConfig(Strict):
    kind: Literal["induction"] = "induction"
    n_tokens: int = Field(128, gt=1, description="ordinary tokens (BOS and S come on top)")
    seq_len: int = Field(64, ge=4, description="sequence length")
    d_model: int = Field(16, gt=0, description="residual width")
    batch_size: int = Field(128, gt=0, description="batch of the target's training")
    lr: float = Field(3e-3, gt=0, description="AdamW lr of the target's training")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the target's training")
    warmup_steps: int = Field(200, ge=0, description="linear lr warm-up steps")
    max_steps: int = Field(30000, gt=0, description="give up after this many steps")
    target_accuracy: float = Field(0.99, gt=0, le=1, description="held-out last-position accuracy the target must reach")
    settle_steps: int = Field(1000, ge=0, description="steps trained on after reaching target_accuracy, lr decaying linearly to 0")
    seed: int = Field(0, **SEED, description="seed of the target's init and training data")
    path: str | None = Field(None, description="load trained weights from this safetensors file instead of training")


class InductionDataConfig(Strict):
    kind: Literal["induction"] = "induction"


class HuggingFaceTargetConfig(Strict):
    kind: Literal["huggingface"] = "huggingface"
    model: str = Field(
        description="'smollm2' (fetched offline, see `tspd assets`), 'tiny-gpt2' / 'tiny-llama' (random, for tests), "
        "or a local Hugging Face folder (GPT-2 folders without tokenizer files get the offline GPT-2 tokenizer)"
    )
    seed: int = Field(0, **SEED, description="init seed of the tiny random models")


class TextDataConfig(Strict):
    kind: Literal["text"] = "text"
    source: str = Field("wiki", description="'wiki' (English Wikipedia lead sections, offline) or a .txt file or folder")
    seq_len: int = Field(64, ge=2, description="tokens per chunk")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="documents kept out of training (evaluation text)")
    facts_fraction: float = Field(
        0.0, ge=0, le=1, description="share of each batch made of athlete -> sport sentences (discovery athletes only)"
    )


TargetConfig = Annotated[
    Union[TMSTargetConfig, InductionTargetConfig, HuggingFaceTargetConfig], Field(discriminator="kind")
]
DataConfig = Annotated[Union[TMSDataConfig, InductionDataConfig, TextDataConfig], Field(discriminator="kind")]


# The data kind each target kind trains on (the CLI builds batches with the target's settings).
DATA_FOR_TARGET = {"tms": "tms", "induction": "induction", "huggingface": "text"}


class RunConfig(Strict):
    seed: int = Field(0, **SEED, description="seed of init, masks and data order")
    target: TargetConfig | None = Field(None, description="how the CLI builds the target (None when using the Python API)")
    data: DataConfig | None = Field(None, description="how the CLI makes batches (None when using the Python API)")
    sites: list[SiteConfig] = Field(description="which weights to decompose, by module-path glob, each with its C")
    ci: CIConfig = Field(default_factory=CIConfig, description="causal-importance function")
    masks: MaskConfig = Field(default_factory=MaskConfig, description="mask sampling and routing")
    losses: LossConfig = Field(default_factory=LossConfig, description="loss coefficients")
    minimality: MinimalityConfig = Field(default_factory=MinimalityConfig, description="importance-minimality exponent")
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig, description="adversarial recon settings")
    output: OutputConfig = Field(default_factory=OutputConfig, description="output divergence")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation and bookkeeping")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation thresholds")
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig, description="merging co-active subcomponents")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if not self.sites:
            raise ValueError("sites is empty: name at least one weight, e.g. sites: [{pattern: 'linear1', C: 20}]")
        m = self.minimality
        if m.anneal_end_frac < m.anneal_start_frac:
            raise ValueError("minimality.anneal_end_frac must be >= minimality.anneal_start_frac")
        if self.train.weight_decay > 0 and self.train.optimizer != "adamw":
            raise ValueError(f"train.weight_decay ({self.train.weight_decay}) is used by train.optimizer: adamw only; "
                             "set train.optimizer=adamw, or drop train.weight_decay")
        if self.target is not None and self.data is not None:
            want = DATA_FOR_TARGET[self.target.kind]
            if self.data.kind != want:
                raise ValueError(
                    f"data.kind {self.data.kind!r} does not suit target.kind {self.target.kind!r}: "
                    f"a {self.target.kind} target takes data of kind {want!r} (e.g. --set 'data={{kind: {want}}}')"
                )
        return self

    def with_absolute_paths(self) -> "RunConfig":
        """The config with its relative file paths (a Hugging Face target folder, an induction
        target.path, a text source) made absolute from the current folder, so that the run folder's
        config.yaml reads the same from anywhere (`tspd serve`, `tspd.load` run elsewhere)."""
        def absolute(p: str | None, names: tuple[str, ...] = ()) -> str | None:
            if p is None or p in names or Path(p).is_absolute() or not Path(p).exists():
                return p
            return str(Path(p).resolve())

        t, d = self.target, self.data
        update = {}
        if t is not None and t.kind == "huggingface":
            update["target"] = t.model_copy(update={"model": absolute(t.model, ("smollm2", "tiny-gpt2", "tiny-llama"))})
        elif t is not None and t.kind == "induction":
            update["target"] = t.model_copy(update={"path": absolute(t.path)})
        if d is not None and d.kind == "text":
            update["data"] = d.model_copy(update={"source": absolute(d.source, ("wiki",))})
        return self.model_copy(update=update)

    def check_new_run(self) -> None:
        """Refuse, before a new run builds or moves anything, settings that cannot train or would do
        nothing (a saved run's config with one of them still loads, and resumes)."""
        problems = []
        if not any(self.losses.model_dump().values()):
            problems.append("every losses.* coefficient is 0: nothing to train; set some, e.g. losses.stochastic_recon=1 "
                            "and losses.importance_minimality=3e-3")
        positions = self.output.positions
        if positions is not None and not positions:
            problems.append("output.positions is empty: use null for every position, or list some, e.g. [-1]")
        elif positions is not None and len(set(positions)) < len(positions):
            problems.append(f"output.positions {positions} lists a position twice (it would count double); list each once")
        if self.train.fuse_head is True and self.output.divergence != "kl":
            problems.append("train.fuse_head: true fuses the output head with the KL only; with output.divergence "
                            f"{self.output.divergence!r} set train.fuse_head to auto or false")
        if not self.ci.hidden and self.ci.kind != "shared_mlp":
            problems.append(f"ci.hidden is empty: ci.kind {self.ci.kind!r} takes its first width (an empty list fell back "
                            "to 16); give one, e.g. ci.hidden=[16] (only shared_mlp runs without a hidden layer)")
        for key in ("active_threshold", "alive_threshold"):
            if getattr(self.eval, key) >= 1:
                problems.append(f"eval.{key} {getattr(self.eval, key)}: CI never exceeds 1, so nothing would count; use a value below 1")
        if self.train.threads is not None and self.train.threads > 1024:
            problems.append(f"train.threads {self.train.threads} is more than torch can start (it crashes); use at most "
                            "the machine's cores")
        try:
            self._check_against_the_target()
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ConfigError("the config cannot start a run: " + "; ".join(problems))

    def _check_against_the_target(self) -> None:
        """What the config's own target settings rule out, before anything is built or trained: an
        attention CI or output positions on a target without positions (TMS), an attention CI too
        short for the sequences, positions beyond them."""
        t, d, positions = self.target, self.data, self.output.positions
        if t is not None and t.kind == "tms":
            if self.ci.kind == "attention":
                raise ValueError("ci.kind attention reads positions, and a tms target has none: use mlp, vector_mlp or shared_mlp")
            if positions is not None:
                raise ValueError("output.positions is set but a tms target's output has no positions: set it to null")
            return
        seq_len = t.seq_len if t is not None and t.kind == "induction" else d.seq_len if d is not None and d.kind == "text" else None
        if seq_len is None:
            return
        where = "target.seq_len" if t is not None and t.kind == "induction" else "data.seq_len"
        if self.ci.kind == "attention" and self.ci.attention.max_len < seq_len:
            raise ValueError(f"ci.attention.max_len {self.ci.attention.max_len} is shorter than the sequences "
                             f"({where} {seq_len}): set ci.attention.max_len >= {seq_len}")
        bad = [q for q in positions or [] if not -seq_len <= q < seq_len]
        if bad:
            raise ValueError(f"output.positions {bad} out of range for sequences of {seq_len} ({where}): use "
                             f"positions in [-{seq_len}, {seq_len - 1}], e.g. [-1] for the last")

    # ---- YAML in and out -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        path = Path(path)
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        return cls.from_dict(raw, overrides, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> "RunConfig":
        raw = apply_overrides(raw, overrides or [])
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_explain(err, source, overrides or [])) from None

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        return RunConfig.from_dict(self.model_dump(mode="json"), overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML (keys unique per mapping), or a ConfigError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: is it a config file? (a YAML file in UTF-8)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(err)}; fix the file's syntax") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one:
    a second `train:` block would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"a key of type {type(key).__name__} cannot be a "
                                                        "config key", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key].line + 1}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        try:
            _set_path(out, key, value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value {value!r} is not valid YAML ({_one_line(err)}); quote it, "
                "e.g. --set 'train.steps=100' or --set 'sites.0.pattern=\"h.*\"'"
            ) from None
        except (TypeError, IndexError, ValueError, AttributeError) as err:
            raise ConfigError(
                f"override {item!r}: cannot set {key!r} ({err}); keys are dotted paths such as train.steps "
                "or sites.0.C (see `tspd config-keys`)"
            ) from None
    return out


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _set_path(out: dict[str, Any], key: str, value: str) -> None:
    node: Any = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise TypeError(f"{part!r} is below a plain value")
    last = parts[-1]
    new = yaml.load(value, Loader=_UniqueKeyLoader)
    if isinstance(node, list):
        node[int(last)] = new
    elif isinstance(node, dict):
        old = node.get(last)
        if isinstance(old, dict) and isinstance(new, dict) and new.get("kind", old.get("kind")) == old.get("kind"):
            # `train={steps: 2}` sets those keys and keeps the section's others (the recipe's tuned values);
            # a mapping of another kind (`data={kind: text}`) replaces the section.
            node[last] = _merged(old, new)
        else:
            node[last] = new
    else:
        raise TypeError(f"{last!r} is below a plain value")


def _merged(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# The sections whose keys depend on their `kind`, and each kind's model.
KIND_CONFIGS = (("target", (TMSTargetConfig, InductionTargetConfig, HuggingFaceTargetConfig)),
                ("data", (TMSDataConfig, InductionDataConfig, TextDataConfig)))


def kind_of(model: type[BaseModel]) -> str:
    return model.model_fields["kind"].default


def _all_keys() -> list[str]:
    """Every dotted key a config can hold (the kinds' target.* and data.* keys merged), for suggestions."""
    keys = [k for k, _, _ in describe_keys()]
    keys += [k.split(".")[0] for k in keys if "." in k]  # the sections themselves (a misspelt `lossess.faithfulness`)
    keys += [f"sites.N.{k}" for k, _, _ in describe_keys(SiteConfig)]
    for section, kinds in KIND_CONFIGS:
        keys += [f"{section}.{k}" for kind in kinds for k, _, _ in describe_keys(kind)]
    return sorted(set(keys))


def _explain(err: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """One line per problem: the key as the user writes it (no union tag such as 'tms' inside
    target.*), the --set override it came from, and for an unknown key the closest known ones."""
    import difflib

    given = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}
    lines = [f"{source}" + (" with --set " + " ".join(overrides) if overrides else "") + ": invalid config"]
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        if len(parts) > 1 and any(parts[0] == sec and parts[1] in {kind_of(k) for k in kinds} for sec, kinds in KIND_CONFIGS):
            parts.pop(1)
        loc = ".".join(parts)
        origin = f" (from --set {given[loc]})" if loc in given else ""
        if e["type"] == "extra_forbidden":
            pattern = ".".join("N" if p.isdigit() else p for p in parts)
            owners = [
                kind_of(kind) for sec, kinds in KIND_CONFIGS if parts[0] == sec and len(parts) == 2
                for kind in kinds if parts[1] in {k for k, _, _ in describe_keys(kind)}
            ]
            if owners:  # a key of another kind of this section (e.g. a TMS target key on a huggingface target)
                lines.append(f"  key '{loc}'{origin} belongs to {parts[0]}.kind {' or '.join(owners)}, not the "
                             f"{parts[0]}.kind given: remove it or change {parts[0]}.kind")
                continue
            close = [c for c in difflib.get_close_matches(pattern, _all_keys(), n=3, cutoff=0.75) if c != pattern][:2]
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            lines.append(f"  unknown key '{loc}'{origin}: remove it or fix its spelling{hint} (`tspd config-keys` lists every key)")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix to our validators' messages
            # a check of the whole config (RunConfig._check) has no key: its message names the keys
            lines.append(f"  {loc}{origin}: {msg} (got {e.get('input')!r})" if loc else f"  {msg}")
    return "\n".join(lines)


def _literal_choices(annotation) -> list[str]:
    """The allowed values of a Literal (or optional Literal) annotation, as they are written in YAML."""
    from typing import get_args, get_origin

    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    args = get_args(annotation)
    if args and type(None) in args:
        inner = [c for a in args if a is not type(None) for c in _literal_choices(a)]
        return inner + ["null"] if inner else []
    return []


def describe_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every config field, for docs (`tspd config-keys`)."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if sub is not None:
            rows += describe_keys(sub, key + ".")
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        text = field.description or ""
        choices = _literal_choices(field.annotation)
        if choices and not (name == "kind" and len(choices) == 1):
            text += f" (one of: {', '.join(choices)})"
        rows.append((key, default, text))
    return rows
