"""Fetch the real tokenizer vocabularies the prompt-rendering tests need (no model hub needed).

The llama-cpp-python source distribution ships vocab-only GGUF files of Llama-2 (SPM), Llama-3
(BPE) and Qwen2, plus llama.cpp's reference tokenisations of a test text (`.inp`/`.out`).
This script downloads that sdist once with pip (it is never built or installed), checks its
SHA-256, and extracts only those files into a cache folder. Idempotent: a complete, verified
cache is left alone. Run by `make setup-test`; tests/test_real_vocab.py reads the cache.

Usage: python tests/fetch_vocabs.py [CACHE_DIR]   (default: $STAGELENS_VOCAB_DIR or tests/.vocab)
Exits 0 with a warning when the download fails, unless CI=true (then the failure is an error).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_DIR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models"
VOCABS = ("llama-spm", "llama-bpe", "qwen2")
# The GGUF files are pinned by hash: a changed vocabulary must fail loudly, not change the tests.
GGUF_SHA256 = {
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
}


def default_cache_dir() -> Path:
    """$STAGELENS_VOCAB_DIR, else tests/.vocab beside this file."""
    env = os.environ.get("STAGELENS_VOCAB_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / ".vocab"


def vocab_files(vocab: str) -> tuple[str, str, str]:
    """File names of one vocabulary: the GGUF and llama.cpp's reference test input/output."""
    gguf = f"ggml-vocab-{vocab}.gguf"
    return gguf, gguf + ".inp", gguf + ".out"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_complete(cache: Path) -> bool:
    """True when every file is present and every GGUF has its pinned hash."""
    for vocab in VOCABS:
        if not all((cache / name).is_file() for name in vocab_files(vocab)):
            return False
        if sha256(cache / vocab_files(vocab)[0]) != GGUF_SHA256[vocab]:
            return False
    return True


def download_sdist(dest: Path) -> Path:
    """pip-download the pinned sdist (no dependencies, no build) and verify its hash."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one llama-cpp-python sdist in {dest}, found {archives}")
    if sha256(archives[0]) != SDIST_SHA256:
        raise RuntimeError(f"{archives[0].name}: SHA-256 differs from the pinned {SDIST_SHA256}")
    return archives[0]


def extract_vocabs(archive: Path, cache: Path) -> None:
    """Copy only the vocabulary files out of the sdist, each written atomically."""
    wanted = {f"{MEMBER_DIR}/{name}": name for vocab in VOCABS for name in vocab_files(vocab)}
    cache.mkdir(parents=True, exist_ok=True)
    # The cache is a download, never a source file: keep it out of git without touching .gitignore.
    (cache / ".gitignore").write_text("*\n")
    found = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            data = tar.extractfile(member).read()
            tmp = cache / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, cache / name)
            found.add(name)
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise RuntimeError(f"{archive.name} lacks {missing} under {MEMBER_DIR}")
    for vocab in VOCABS:
        gguf = vocab_files(vocab)[0]
        if sha256(cache / gguf) != GGUF_SHA256[vocab]:
            raise RuntimeError(f"{cache / gguf}: SHA-256 differs from the pinned {GGUF_SHA256[vocab]}")


def fetch(cache: Path) -> bool:
    """Make the cache complete; returns True when a download was needed."""
    if cache_complete(cache):
        return False
    with tempfile.TemporaryDirectory(prefix="stagelens-vocab-") as tmp:
        extract_vocabs(download_sdist(Path(tmp)), cache)
    return True


def main(argv: list[str]) -> int:
    cache = Path(argv[1]) if len(argv) > 1 else default_cache_dir()
    try:
        fetched = fetch(cache)
    except (OSError, RuntimeError, subprocess.CalledProcessError, tarfile.TarError) as err:
        message = f"fetch_vocabs: could not fetch the real vocabularies into {cache}: {err}"
        if os.environ.get("CI", "").lower() == "true":
            print(message, file=sys.stderr)
            return 1
        print(message + "\n  (tests/test_real_vocab.py will be skipped)", file=sys.stderr)
        return 0
    print(f"fetch_vocabs: {'fetched' if fetched else 'up to date'}: {cache}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
