"""Hugging Face causal language models as targets: load by local path (or by name where a hub is
reachable), or build small random GPT-2 / Llama configs offline for tests and benchmarks.

Sites are module paths, e.g. `transformer.h.*.mlp.c_fc` (GPT-2, Conv1D) or
`model.layers.*.mlp.down_proj` (Llama / SmolLM2, nn.Linear).

Example:
    >>> from tspd.targets.huggingface import tiny_gpt2
    >>> model = tiny_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    >>> model(__import__("torch").zeros(1, 4, dtype=__import__("torch").long)).logits.shape
    torch.Size([1, 4, 64])
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face targets need the `transformers` package: pip install 'transformers>=4.45'"
        ) from None
    return transformers


def _prepare(model: nn.Module) -> nn.Module:
    """Eval mode, no KV cache (SPD runs whole sequences; a cache only costs memory)."""
    model.eval()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


def load_causal_lm(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a local folder (config.json + weights), or by hub name where reachable."""
    tf = _transformers()
    path = Path(name_or_path)
    local = path.exists()
    if not local and (str(name_or_path).startswith((".", "/")) or path.suffix):
        raise FileNotFoundError(f"model folder {path} does not exist; pass a folder holding config.json and weights")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, local_files_only=local)
    except OSError as err:
        raise OSError(
            f"could not load {name_or_path!r} ({err}). Model hubs are often unreachable here: download the "
            "model elsewhere and pass its local folder (with config.json and *.safetensors)"
        ) from None
    return _prepare(model)


def tiny_gpt2(
    n_layer: int = 2, n_head: int = 4, n_embd: int = 128, vocab_size: int = 1024, n_positions: int = 128, seed: int = 0
) -> nn.Module:
    """A randomly initialised GPT-2 (defaults: the `tiny-gpt2` benchmark: 2 layers, 4 heads, d 128,
    vocab 1024, context 128)."""
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
        bos_token_id=0, eos_token_id=0,
    )
    return _prepare(tf.GPT2LMHeadModel(cfg))


def tiny_llama(
    n_layer: int = 2, n_head: int = 4, n_kv_head: int = 2, d_model: int = 64, d_ff: int = 128, vocab_size: int = 256,
    max_positions: int = 128, seed: int = 0,
) -> nn.Module:
    """A randomly initialised Llama-family model (the SmolLM2 architecture, scaled down)."""
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head, hidden_size=d_model,
        intermediate_size=d_ff, vocab_size=vocab_size, max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _prepare(tf.LlamaForCausalLM(cfg))
