"""Target builders: from a config's `target` section to a frozen nn.Module."""

from __future__ import annotations

from torch import nn


def build_target(cfg, train: bool = True) -> nn.Module:
    """Build the target a config names. With train=False, return an untrained module of the same
    shape (for loading saved weights into)."""
    if cfg.kind == "tms":
        from tspd.targets.tms import TMSModel, train_tms

        if not train:
            return TMSModel(cfg.n_features, cfg.d_hidden)
        return train_tms(
            cfg.n_features, cfg.d_hidden, cfg.feature_probability, cfg.train_steps, cfg.train_batch_size, cfg.train_lr, cfg.seed
        )
    if cfg.kind == "induction":
        from tspd.data.induction import InductionTask
        from tspd.targets.induction import InductionTransformer, train_from_config

        task = InductionTask(cfg.n_tokens, cfg.seq_len)
        if not train:
            return InductionTransformer(task.vocab_size, cfg.d_model, 2, cfg.seq_len)
        if cfg.path is not None:
            from pathlib import Path

            from safetensors.torch import load_file

            path = Path(cfg.path)
            if not path.exists():
                raise FileNotFoundError(f"target.path {path} does not exist; train one with `tspd train-target induction`")
            model = InductionTransformer(task.vocab_size, cfg.d_model, 2, cfg.seq_len)
            try:
                model.load_state_dict(load_file(path))
            except RuntimeError:
                raise ValueError(f"target.path {path} does not fit the config's induction target{_settings_hint(cfg, path)}") from None
            return model
        model, _ = train_from_config(cfg, progress=True)
        return model
    if cfg.kind == "huggingface":
        from tspd.targets.huggingface import load_lm

        return load_lm(cfg.model, cfg.seed)[0]
    raise ValueError(f"unknown target kind {cfg.kind!r}")


def _settings_hint(cfg, path) -> str:
    """What differs between a target file's own settings (target.yaml beside it) and the config's."""
    from pathlib import Path

    import yaml

    saved_file = Path(path).with_name("target.yaml")
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return ": is it an induction target (`tspd train-target induction`)?"
    if saved.get("kind", "induction") != "induction":
        return f": it is a {saved.get('kind')} target ({saved_file})"
    diff = [f"target.{k}={v}" for k, v in saved.items() if k in ("n_tokens", "seq_len", "d_model") and getattr(cfg, k) != v]
    return f": it was made with {', '.join(diff)} ({saved_file}); set those" if diff else ""


def saved_with_run(cfg) -> bool:
    """Whether a run folder stores the target's weights. A Hugging Face target is named by the
    config (a cached or local model, or a seeded tiny one), so its weights are not copied."""
    return cfg is None or cfg.kind != "huggingface"


def build_data(cfg, target_cfg, batch_size: int, seed: int):
    """The training data source a config names: a callable step -> batch."""
    if cfg.kind == "tms":
        from tspd.data.tms import TMSData

        return TMSData(target_cfg.n_features, cfg.feature_probability, batch_size, seed)
    if cfg.kind == "induction":
        from tspd.data.induction import InductionData, InductionTask

        return InductionData(InductionTask(target_cfg.n_tokens, target_cfg.seq_len), batch_size, seed)
    if cfg.kind == "text":
        from tspd.data.mix import text_data

        if target_cfg is None or target_cfg.kind != "huggingface":
            raise ValueError("data kind 'text' needs a target of kind 'huggingface' (its tokenizer cuts the text)")
        return text_data(cfg, target_cfg, batch_size, seed)
    raise ValueError(f"unknown data kind {cfg.kind!r}")
