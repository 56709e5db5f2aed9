"""Index arrays cached as `.npy` files keyed by a hash of what they are built from, built once.

Why: the document/sample/shuffle indices of a large run take seconds to build and every rank needs the
same ones. DESIGN.md decision 6: with torch.distributed initialised, global rank 0 builds and writes
them while the others wait at a collective, then they load rank 0's files (memory-mapped). Files are
written under a unique temporary name and renamed, so a reader never sees a half-written array.
If rank 0 fails to build, every rank raises (no rank is left waiting on a barrier).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Callable

import numpy as np

Arrays = dict[str, np.ndarray]


def hash_key(*parts: Any) -> str:
    """A short stable hex digest of scalars, strings and numpy arrays (arrays hash dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            h.update(f"array:{arr.dtype.str}:{arr.shape}:".encode())
            h.update(memoryview(arr).cast("B"))
        else:
            h.update(f"{type(part).__name__}:{part!r};".encode())
    return h.hexdigest()[:20]


def _paths(cache_dir: str, stem: str, names: tuple[str, ...]) -> dict[str, str]:
    return {n: os.path.join(cache_dir, f"{stem}-{n}.npy") for n in names}


def _load(paths: dict[str, str]) -> Arrays | None:
    """Memory-map every cached array, or None when any is missing or unreadable (then it is rebuilt)."""
    out = {}
    for name, path in paths.items():
        try:
            out[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
    return out


def _write_atomic(path: str, write: Callable[[Any], None]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(cache_dir: str, stem: str, paths: dict[str, str], arrays: Arrays, describe: dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    for name, path in paths.items():
        _write_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
    # Human-readable record of what the hash stands for (not read back).
    text = json.dumps(describe, indent=1, sort_keys=True, default=str).encode()
    _write_atomic(os.path.join(cache_dir, f"{stem}.json"), lambda f: f.write(text))


def _build_locally(cache_dir: str, stem: str, paths: dict[str, str], build: Callable[[], Arrays],
                   describe: dict) -> tuple[Arrays, bool]:
    arrays = _load(paths)
    if arrays is not None:
        return arrays, False
    arrays = build()
    _save(cache_dir, stem, paths, arrays, describe)
    return arrays, True


def _all_ranks_ok(ok: bool) -> bool:
    """A barrier that also tells every rank whether all of them succeeded (MIN all-reduce of a flag)."""
    from megalm.parallel.device import all_ranks

    return all_ranks(ok)


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def load_or_build(cache_dir: str | None, stem: str, names: tuple[str, ...], build: Callable[[], Arrays],
                  describe: dict) -> tuple[Arrays, bool]:
    """The arrays `names` for cache entry `stem` (which must embed the parameter hash), and whether this
    process built them. `cache_dir=None` means no caching: build in memory. Collective when
    torch.distributed is initialised: every rank must call it, in the same order."""
    if cache_dir is None:
        return build(), True
    paths = _paths(cache_dir, stem, names)
    if not _distributed():
        return _build_locally(cache_dir, stem, paths, build, describe)

    import torch.distributed as dist

    built, error = False, None
    if dist.get_rank() == 0:
        try:
            arrays, built = _build_locally(cache_dir, stem, paths, build, describe)
        except Exception as e:  # reported after the collective so no rank waits forever
            error = e
    if not _all_ranks_ok(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed to build the index cache {stem!r} in {cache_dir}; see its error")
    if dist.get_rank() != 0:
        # Normally rank 0's files; on a node that does not share cache_dir with rank 0 they are missing
        # and this rank builds its own copy (deterministic, so identical).
        arrays, built = _build_locally(cache_dir, stem, paths, build, describe)
    return arrays, built
