"""Models by name, offline: a Hugging Face repo id from the local cache, or any ``.gguf`` file.

Why offline only: amygdala never downloads at run time (a build must be reproducible and must
not stall on a network that is not there). A repo id such as ``Qwen/Qwen2.5-0.5B-Instruct``
is looked up in the Hugging Face cache the way ``transformers`` would find it
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) with
``local_files_only=True``, so a missing model is a one-line error that says where it looked
and how to fill the cache, never a download. A ``.gguf`` file is dequantised once by
transformers into an fp32 folder under ``$AMYGDALA_HOME/models/``, like the default model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from amygdala import AmygdalaError

#: ``org/name`` as the Hub spells repo ids (an optional ``@revision`` after it).
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


def hub_cache() -> Path:
    """The cache folder transformers reads: ``HF_HUB_CACHE``, ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``.

    Read from the environment on every call (not huggingface_hub's import-time constants), so a
    test or a caller that sets ``HF_HUB_CACHE`` later is obeyed.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "huggingface" / "hub"


def looks_like_repo_id(spec: str) -> bool:
    """``org/name`` that is not an existing path (a folder ``org/name`` on disk stays a folder)."""
    return bool(REPO_ID_RE.match(spec)) and not Path(spec).exists()


def resolve_repo_id(spec: str) -> Path:
    """The snapshot folder of ``org/name[@revision]`` in the local cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    cache = hub_cache()
    fill = (f"fill it on a machine with internet (huggingface-cli download {repo_id}, with HF_HUB_CACHE "
            f"pointing at the cache) and copy the models--{repo_id.replace('/', '--')} folder into {cache}, "
            "or pass a model folder")
    try:
        folder = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise AmygdalaError(f"--model {spec}: not in the local Hugging Face cache {cache} (nothing is downloaded); {fill}") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise AmygdalaError(f"--model {spec}: the cached snapshot {path} has no config.json (an incomplete copy?); {fill}")
    return path


def hub_name(path: Path) -> str | None:
    """``org/name`` when ``path`` is a snapshot in a Hub cache (``models--org--name/snapshots/<hash>``)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/", 1)
    return None


def gguf_target(path: Path, home: Path) -> Path:
    """Where ``path``'s dequantised folder is cached: its stem plus a key of where it is, its size
    and modification time, so an edited or replaced file converts again and two files of one name
    do not collide."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return home / "models" / f"{path.stem}-{key}"


def resolve_gguf(path: Path, home: Path, convert) -> Path:
    """The fp32 folder of a ``.gguf`` file, converted once with ``convert(folder, name, target)``."""
    if not path.is_file():
        raise AmygdalaError(f"--model {path}: no such .gguf file")
    target = gguf_target(path, home)
    if (target / "config.json").is_file():
        return target
    import logging

    logging.getLogger(__name__).warning("dequantising %s once into %s (transformers' GGUF loader)", path, target)
    try:
        convert(path.parent, path.name, target)
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # an architecture or quant type transformers cannot read
        raise AmygdalaError(
            f"--model {path}: transformers cannot dequantise this GGUF ({str(e).splitlines()[0][:200]}); "
            "convert it to a transformers folder, or use the original model's folder or repo id"
        ) from None
    return target
