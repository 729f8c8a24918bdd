"""Merging stored adapters into a base model: picking each adapter's variant for the base,
checking everything before a tensor is read, and recording the inputs in the output.

The streaming arithmetic and the checkpoint writer are :mod:`lorahub.merge`'s; the cache of
merged checkpoints is :mod:`lorahub.merged_cache`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aliases import Progress, StrPath
from .errors import InvalidMergeArgument, MergeBaseNotFound
from .info import AdapterInfo
from .manifest import BaseRef
from .refs import local_path

if TYPE_CHECKING:
    import torch

    from .base import BaseModel
    from .merge import MergeResult
    from .resolution import Resolver


def merge_inputs(
    resolver: Resolver,
    base: StrPath,
    adapters: str | Sequence[str],
    weights: Sequence[float] | None,
) -> tuple[BaseModel, list[AdapterInfo], list[float], BaseRef]:
    """The opened base, each adapter's variant for it, one weight each, and the base's
    identity, all checked before a merge reads a tensor.

    Raises:
        InvalidMergeArgument: no adapters, or a weight count that does not match.
        MergeBaseNotFound: a base whose weights are not on this machine.
        IncompatibleAdapter: an adapter has no variant that fits the base.
    """
    from .base import open_base

    refs = [adapters] if isinstance(adapters, str) else list(adapters)
    if not refs:
        raise InvalidMergeArgument("nothing to merge: give at least one adapter")
    w = [1.0] * len(refs) if weights is None else [float(x) for x in weights]
    if len(w) != len(refs):
        raise InvalidMergeArgument(f"got {len(w)} weights for {len(refs)} adapters; give one each")
    model = open_base(base)
    if model.root is None:
        raise MergeBaseNotFound(
            f"{model.display} is not on this machine; merging needs its weights "
            f"(download it with `hf download {model.repo_id}`)"
        )
    ctx = resolver.base_context(base, model)  # headers read once, hash from the cache
    infos = [resolver.resolve(r, base, strict=True, ctx=ctx)[0] for r in refs]
    return model, infos, w, ctx.ref


def merge_metadata(
    base: BaseRef, infos: Sequence[AdapterInfo], weights: Sequence[float]
) -> dict[str, Any]:
    """What a merged checkpoint's safetensors metadata records of its inputs."""
    return {
        "base_name": base.name,
        "base_signature": base.signature,
        "base_content_hash": base.content_hash,
        "adapters": [
            {"digest": i.digest, "refs": list(i.refs), "weight": w}
            for i, w in zip(infos, weights, strict=True)
        ],
    }


def merge_to_folder(
    resolver: Resolver,
    base: StrPath,
    adapters: str | Sequence[str],
    weights: Sequence[float] | None,
    *,
    out: StrPath,
    device: str,
    dtype: str | None,
    max_shard_size: int | str,
    force: bool,
    progress: Progress | None,
) -> MergeResult:
    """Merge into a checkpoint folder at ``out``; see ``Hub.merge``. The output is checked
    before adapter folders are added to the store, so a refused output leaves no trace."""
    from .merge import merge_to_dir
    from .outputs import check_output
    from .units import parse_size

    given = [adapters] if isinstance(adapters, str) else list(adapters)
    inputs = [("an adapter", p) for p in map(local_path, given) if p is not None]
    if Path(base).expanduser().exists():
        inputs.append(("the base model", Path(base).expanduser()))
    check_output(out, force=force, inputs=inputs, store_home=resolver.store.home, kind="merge")
    model, infos, w, base_ref = merge_inputs(resolver, base, adapters, weights)
    return merge_to_dir(
        model,
        [resolver.store.load_adapter(i) for i in infos],
        w,
        out=Path(out),
        device=device,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        force=force,
        progress=progress,
        extra_metadata=merge_metadata(base_ref, infos, w),
        inputs=inputs,
    )


def iter_stored(
    resolver: Resolver,
    base: StrPath,
    adapters: str | Sequence[str],
    weights: Sequence[float] | None,
    *,
    device: str,
    dtype: str | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's ``(name, tensor)`` pairs, one at a time; see ``Hub.iter_merged``."""
    from .merge import iter_merged

    model, infos, w, _ = merge_inputs(resolver, base, adapters, weights)
    loaded = [resolver.store.load_adapter(i) for i in infos]
    return iter_merged(model, loaded, w, device=device, dtype=dtype)
