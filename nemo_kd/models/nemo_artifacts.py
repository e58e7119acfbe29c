"""The student's tokenizer carried inside its ``.nemo``, so that the file restores and exports anywhere.

A ``.nemo`` is a tar of ``model_config.yaml``, ``model_weights.ckpt`` and NeMo *artifacts*:
files registered with :meth:`ModelPT.register_artifact` that ``save_to`` copies into the
archive as ``<uuid>_<name>`` and records in the config as ``nemo:<uuid>_<name>``. NeMo
registers files, not directories, so the tokenizer directory is registered file by file
(the files of :func:`nemo_kd.convert.copy_tokenizer_files`: ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``tokenizer.model``, vocab/merges,
the chat template) under one config section::

    tokenizer:
      library: huggingface
      source: /where/the/files/came/from        # provenance only; never read on restore
      files:
        tokenizer_json: {name: tokenizer.json, path: nemo:3f2a..._tokenizer.json}
        tokenizer_config_json: {name: tokenizer_config.json, path: nemo:9b1c..._tokenizer_config.json}

Why a cache directory. NeMo extracts a ``.nemo`` into a temporary directory that is deleted
when ``restore_from`` returns, so the paths it resolves for artifacts die with it. The files
are therefore copied into a content-addressed directory (``$NEMO_KD_CACHE_DIR``, else
``$XDG_CACHE_HOME/nemo_kd``, else ``~/.cache/nemo_kd``; ``tokenizers/<sha256 of the files>``),
written atomically (staged, then renamed: concurrent ranks restoring the same model are
safe), and registered again from there as local files. That directory is the model's
``tokenizer_dir`` (``AutoTokenizer.from_pretrained`` loads it), and a restored model saves a
new ``.nemo`` without needing the one it came from.

:func:`extract_nemo_tokenizer` reads the same files straight out of a ``.nemo`` with
``tarfile`` (no NeMo, no model): the Hugging Face export uses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from typing import Dict, List, Optional

from nemo_kd.convert.checkpoint_io import TOKENIZER_DIR, TOKENIZER_FILES, copy_tokenizer_files, is_megatron_checkpoint

__all__ = ["TOKENIZER_SECTION", "NemoTokenizerError", "cache_root", "checkpoint_tokenizer_dir", "extract_nemo_tokenizer",
           "nemo_tokenizer_dir", "persist_tokenizer_dir", "register_tokenizer"]

TOKENIZER_SECTION = "tokenizer"  # model config key of the packed tokenizer
_LIBRARY = "huggingface"
_NEMO_PREFIX = "nemo:"  # NeMo's marker for "a file inside this .nemo"


class NemoTokenizerError(ValueError):
    """The packed tokenizer of a ``.nemo`` is missing or does not match its config."""


def cache_root() -> str:
    """Where nemo_kd keeps files that must outlive a restore (created on first use)."""
    root = os.environ.get("NEMO_KD_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "nemo_kd")
    return root


def _file_key(name: str) -> str:
    # OmegaConf paths are dotted: "tokenizer.json" cannot be a key of an artifact's config path.
    return "".join(c if c.isalnum() else "_" for c in name)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(directory: str) -> str:
    """Content hash of a flat directory of tokenizer files: names and bytes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        h.update(name.encode() + b"\0" + _sha256(os.path.join(directory, name)).encode() + b"\n")
    return h.hexdigest()


def persist_tokenizer_dir(staged: str) -> str:
    """Move a staged flat directory of tokenizer files to its content-addressed cache place.

    ``staged`` must be on the cache's file system (use :func:`_stage`); it is consumed. An
    identical directory already cached is reused (and a corrupted one replaced), so N ranks
    restoring the same ``.nemo`` end with one copy.
    """
    dst = os.path.join(os.path.dirname(staged), _digest(staged)[:32])
    for _ in range(2):
        if os.path.isdir(dst):
            if _digest(dst) == _digest(staged):
                shutil.rmtree(staged, ignore_errors=True)
                return dst
            shutil.rmtree(dst, ignore_errors=True)  # a partial/corrupted copy: replace it
        try:
            os.rename(staged, dst)
            return dst
        except OSError:  # another rank renamed its identical copy first: compare again
            continue
    raise OSError(f"cannot place the tokenizer files in {dst}")


def _stage() -> str:
    parent = os.path.join(cache_root(), "tokenizers")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError:  # read-only home (some clusters): the node's temp directory still outlives the restore
        parent = os.path.join(tempfile.gettempdir(), f"nemo_kd-{os.getuid()}", "tokenizers")
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".stage-", dir=parent)


def register_tokenizer(model, cfg_section: Optional[dict], source_dir: Optional[str]) -> Optional[str]:
    """Register the student's tokenizer files as ``model``'s artifacts; return their local directory.

    ``source_dir`` (the training data's tokenizer directory, when it exists) wins over a
    ``cfg_section`` already in the config (a restored model's: ``nemo:`` paths resolved in
    the directory NeMo extracted the ``.nemo`` to; or local paths of a model built from a
    restored model's config). Nothing to pack (neither given): ``None``, the ``.nemo`` is
    then saved without a tokenizer as before.
    """
    staged = _stage()
    try:
        if source_dir:
            names = copy_tokenizer_files(source_dir, staged)
            if not names:
                raise NemoTokenizerError(f"{source_dir}: no tokenizer files (tokenizer.json, tokenizer.model, "
                                         "vocab files, tokenizer_config.json) to pack into the .nemo")
            source = os.path.abspath(source_dir)
        elif cfg_section and cfg_section.get("files"):
            if cfg_section.get("library", _LIBRARY) != _LIBRARY:
                raise NemoTokenizerError(f"model.tokenizer.library={cfg_section['library']!r}: only "
                                         f"{_LIBRARY!r} tokenizers are packed by nemo_kd")
            folder = _restore_folder(model)
            for key, entry in cfg_section["files"].items():
                _check_name(entry["name"], f"model.tokenizer.files.{key}.name")
                src = entry["path"]
                if src.startswith(_NEMO_PREFIX):
                    if folder is None:
                        raise NemoTokenizerError(f"model.tokenizer.files.{key}.path={src!r} names a file inside a "
                                                 ".nemo, but no .nemo is being restored")
                    src = os.path.join(folder, src[len(_NEMO_PREFIX):])
                if not os.path.isfile(src):
                    raise NemoTokenizerError(f"tokenizer file {entry['name']} (model.tokenizer.files.{key}) not "
                                             f"found at {src}")
                shutil.copyfile(src, os.path.join(staged, entry["name"]))
            source = cfg_section.get("source")
        else:
            shutil.rmtree(staged, ignore_errors=True)
            return None
        local = persist_tokenizer_dir(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    section = {"library": _LIBRARY, "source": source, "files": {}}
    for name in sorted(os.listdir(local)):
        section["files"][_file_key(name)] = {"name": name, "path": os.path.join(local, name)}
    from omegaconf import OmegaConf, open_dict

    with open_dict(model._cfg):
        model._cfg[TOKENIZER_SECTION] = OmegaConf.create(section)
    for key in section["files"]:
        # a local file: save_to copies it into the archive as nemo:<uuid>_<name> and records that path
        model.register_artifact(f"{TOKENIZER_SECTION}.files.{key}.path", section["files"][key]["path"])
    return local


def _check_name(name, where: str) -> None:
    # a plain file name: a config must not make us write outside the tokenizer directory
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise NemoTokenizerError(f"{where}={name!r} is not a plain file name")


def _restore_folder(model) -> Optional[str]:
    """The directory NeMo extracted the ``.nemo`` being restored to (``None`` when not restoring)."""
    if not model._is_model_being_restored():
        return None
    from nemo.utils.app_state import AppState

    return AppState().nemo_file_folder


def extract_nemo_tokenizer(nemo_path: str, out_dir: str) -> List[str]:
    """Write the tokenizer files packed in ``nemo_path`` to ``out_dir``; return their names.

    A ``.nemo`` saved before tokenizers were packed has no ``tokenizer`` section: ``[]``.
    A recorded file missing from the archive is a :class:`NemoTokenizerError` naming it.
    """
    import yaml

    try:
        with tarfile.open(nemo_path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            if "model_config.yaml" not in members:
                raise NemoTokenizerError(f"{nemo_path}: not a .nemo (no model_config.yaml)")
            cfg = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read()) or {}
            section = cfg.get(TOKENIZER_SECTION) if isinstance(cfg, dict) else None
            files: Dict[str, dict] = (section or {}).get("files") or {}
            if files:
                os.makedirs(out_dir, exist_ok=True)
            written = []
            for key, entry in sorted(files.items()):
                _check_name(entry.get("name"), f"{nemo_path}: model.tokenizer.files.{key}.name")
                path = str(entry.get("path", ""))
                member = members.get(path[len(_NEMO_PREFIX):]) if path.startswith(_NEMO_PREFIX) else None
                if member is None:
                    raise NemoTokenizerError(f"{nemo_path}: tokenizer file {entry.get('name')!r} "
                                             f"(model.tokenizer.files.{key}.path={path!r}) is not in the archive")
                with tar.extractfile(member) as src, open(os.path.join(out_dir, entry["name"]), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                written.append(entry["name"])
    except tarfile.TarError as e:
        raise NemoTokenizerError(f"{nemo_path}: cannot read the .nemo archive: {e}") from e
    return written


def nemo_tokenizer_dir(nemo_path: str) -> Optional[str]:
    """A local directory with the tokenizer packed in ``nemo_path`` (cached; ``None`` if none is packed).

    For code that is handed a ``.nemo`` where an HF tokenizer directory is expected (a ``.nemo``
    teacher or sampler whose tokenizer defaults to its checkpoint path) without restoring the model.
    """
    staged = _stage()
    try:
        if not extract_nemo_tokenizer(nemo_path, staged):
            shutil.rmtree(staged, ignore_errors=True)
            return None
        return persist_tokenizer_dir(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def checkpoint_tokenizer_dir(checkpoint: str, tokenizer: Optional[str] = None) -> str:
    """The Hugging Face tokenizer directory for a model given as ``checkpoint``.

    ``tokenizer`` when given; for a ``.nemo`` file, the tokenizer packed in it
    (:func:`nemo_tokenizer_dir`: found on any machine, whatever path it was saved from); for a
    converted Megatron checkpoint, its ``tokenizer/`` (where
    :func:`~nemo_kd.convert.checkpoint_io.save_megatron_checkpoint` copies it); else the
    checkpoint itself (an HF directory holds its tokenizer files).
    """
    if tokenizer:
        return tokenizer
    if checkpoint.endswith(".nemo") and os.path.isfile(checkpoint):
        found = nemo_tokenizer_dir(checkpoint)
        if found is None:
            raise NemoTokenizerError(f"{checkpoint}: this .nemo packs no tokenizer (saved before nemo_kd packed "
                                     "them): give its tokenizer directory")
        return found
    if is_megatron_checkpoint(checkpoint):
        packed = os.path.join(checkpoint, TOKENIZER_DIR)
        if os.path.isdir(packed):
            return packed
        if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in TOKENIZER_FILES):
            raise NemoTokenizerError(f"{checkpoint}: this Megatron checkpoint has no {TOKENIZER_DIR}/ directory "
                                     "(converted without tokenizer files): give its tokenizer directory")
    return checkpoint
