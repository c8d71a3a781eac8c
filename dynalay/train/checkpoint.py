"""Checkpoints: written atomically (temporary file in the same folder, fsync, ``os.replace``), with
a format tag, a version, the configuration and a SHA-256 over the whole payload (every tensor, and
the configuration, position and metadata), so that a truncated, corrupt or foreign file, or one
written for another configuration, gives a clear :class:`CheckpointError` instead of a half-loaded
(or silently different) model.  Version 1 files (whose SHA-256 covered the tensors of ``state``
only) still load."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any, Dict, Optional

import torch

FORMAT = "dynalay-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, not a dynalay checkpoint, or does not match."""


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def digest(obj) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) in a nested structure."""
    h = hashlib.sha256()
    for name, t in _tensors(obj):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def _skeleton(obj):
    """``obj`` with every tensor replaced by a marker: the non-tensor part, for ``payload_digest``."""
    if isinstance(obj, torch.Tensor):
        return "<tensor>"
    if isinstance(obj, dict):
        return {str(k): _skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_skeleton(v) for v in obj]
    return obj


def payload_digest(payload: Dict[str, Any]) -> str:
    """SHA-256 over every entry of a checkpoint but its own ``sha256``: the tensors (``digest``)
    and the rest as canonical JSON (sorted keys; floats by their repr)."""
    body = {k: v for k, v in payload.items() if k != "sha256"}
    h = hashlib.sha256(digest(body).encode())
    h.update(json.dumps(_skeleton(body), sort_keys=True, default=repr).encode())
    return h.hexdigest()


def save_checkpoint(path: str, payload: Dict[str, Any]) -> str:
    """Write ``payload`` (a dict; must hold ``"state"``) to ``path`` atomically."""
    if "state" not in payload:
        raise ValueError("checkpoint payload needs a 'state' entry")
    for name, t in _tensors(payload["state"]):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to save a checkpoint with non-finite values in {name}")
    full = dict(payload, format=FORMAT, version=VERSION)
    full["sha256"] = payload_digest(full)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-ckpt-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            buf = io.BytesIO()
            torch.save(full, buf)
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# settings added after checkpoints of this version were first written: (section, key, the value
# that reproduces what such a checkpoint was trained with)
LEGACY_DEFAULTS = ((("meta", "model"), "agent_conf", "prob"), (("train_config",), "agent_conf", "prob"),
                   (("train_config",), "agent_lr_decay", "none"))


def _upgrade(obj: Dict[str, Any]) -> None:
    """Fill the settings an older checkpoint lacks with the values it was trained with."""
    for where, key, value in LEGACY_DEFAULTS:
        d = obj
        for k in where:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.setdefault(key, value)


def load_checkpoint(path: str, expect: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read and verify a checkpoint.  ``expect``: entries of the checkpoint's ``"meta"`` that must
    match (e.g. dataset, model configuration)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip errors, unpickling errors, EOF, ...)
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a dynalay checkpoint (format tag missing)")
    version = obj.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path!r} has checkpoint version {version!r}; this dynalay reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if "state" not in obj:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: it has no 'state'")
    if version == 1:  # the SHA-256 covered the tensors of state only
        ok, what = digest(obj["state"]) == obj.get("sha256"), "its tensors do not"
    else:
        ok, what = payload_digest(obj) == obj.get("sha256"), "its contents (tensors or configuration) do not"
    if not ok:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {what} match the stored SHA-256")
    _upgrade(obj)
    if expect:
        meta = obj.get("meta", {})
        for k, v in expect.items():
            if meta.get(k) != v:
                raise CheckpointError(f"checkpoint {path!r} does not match this run: {k} is {meta.get(k)!r} "
                                      f"in the checkpoint, {v!r} here")
    return obj
