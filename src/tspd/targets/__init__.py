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
    raise ValueError(f"unknown target kind {cfg.kind!r}")


def build_data(cfg, target_cfg, batch_size: int, seed: int):
    """The training data source a config names: a callable step -> batch."""
    if cfg.kind == "tms":
        from tspd.data.tms import TMSData

        return TMSData(target_cfg.n_features, cfg.feature_probability, batch_size, seed)
    raise ValueError(f"unknown data kind {cfg.kind!r}")
