"""A Hugging Face cache written by hand, the layout ``huggingface-cli download`` leaves behind:
``models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}``,
so tests resolve repo ids offline exactly as a user's cache would be read."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def write_cached_repo(cache: Path, repo_id: str, model_dir: Path, commit: str = "0" * 39 + "1") -> Path:
    """Copy ``model_dir``'s files into ``cache`` as ``repo_id`` at ``commit``; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.join("..", "..", "blobs", digest), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
