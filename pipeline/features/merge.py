"""`python -m pipeline merge`: the shard files of one features run joined into one file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CacheError
from pipeline.features.store import (
    VIEWS_SPLIT,
    FeatureSet,
    key_diff,
    load_views,
    read_features,
    views_identity,
    write_features,
)
from pipeline.locks import exclusive


def merge_shards(paths: Sequence[Path], out: Path) -> Path:
    """Joins the finished shard files of one run into a file equal to a one-process run.

    Every shard must carry the same key but for its shard number, and all N shards
    must be present. Rows are put back in source order by their `index`. The shards
    are joined in memory (a consolidated copy); fine for feature sizes up to a few GB,
    a streaming k-way merge can replace it when the distributed runner needs one.
    Augmented views are merged the same way, view by view; since a view depends only
    on its example, the merged views equal a one-process run's too.
    """
    if not paths:
        raise CacheError("merge needs at least one shard file.")
    sets = [read_features(Path(p)) for p in paths]
    num_shards = sets[0].attrs["num_shards"]
    shards = sorted(s.attrs["shard_index"] for s in sets)
    if shards != list(range(num_shards)) or any(s.attrs["num_shards"] != num_shards for s in sets):
        raise CacheError(
            f"Expected shard files 0..{num_shards - 1} of one run. Received shards "
            f"{shards} ({', '.join(str(p) for p in paths)})."
        )
    base = {k: v for k, v in sets[0].key.items() if k != "shard"}
    for s in sets[1:]:
        diff = key_diff(base, {k: v for k, v in s.key.items() if k != "shard"})
        if diff:
            raise CacheError(f"{s.path} belongs to another run than {sets[0].path}: {diff}.")
    attrs = dict(sets[0].attrs)
    attrs.update(shard_index=0, num_shards=1, key={**sets[0].key, "shard": [0, 1]})
    attrs["config"] = {**attrs["config"], "shard_index": 0, "num_shards": 1}
    attrs.pop("complete", None)
    splits = {}
    for name in sets[0].splits:
        parts = [s.splits[name] for s in sets]
        order = np.argsort(np.concatenate([p.index for p in parts]), kind="stable")
        skipped = sorted((i for s in sets for i in s.split_attrs[name]["skipped"]), key=lambda d: d["index"])
        split_attrs = {**sets[0].split_attrs[name], "num_inputs": sum(s.split_attrs[name]["num_inputs"] for s in sets)}
        split_attrs.update(num_skipped=len(skipped), skipped=skipped)
        rows = (
            np.concatenate([p.features for p in parts])[order],
            np.concatenate([p.labels for p in parts])[order],
            np.concatenate([p.index for p in parts])[order],
            list(np.concatenate([p.ids for p in parts])[order]),
        )
        splits[name] = ([rows], split_attrs)
    attrs["num_skipped"] = sum(len(a["skipped"]) for _, a in splits.values())
    with exclusive(out, what="merged feature file"):  # one writer of `out` and its temporary file
        return write_features(
            out,
            attrs=attrs,
            splits=splits,
            feature_dim=sets[0].attrs["feature_dim"],
            dtype=sets[0].splits[next(iter(sets[0].splits))].features.dtype,
            views=_merge_views(sets),
        )


def _merge_views(sets: Sequence[FeatureSet]) -> tuple[list[tuple], dict[str, Any]] | None:
    """The views of all shards in source order, view-major, or None when no shard has views."""
    described = {(s.num_views, json.dumps(views_identity(s.view_attrs or {}), sort_keys=True)) for s in sets}
    if len(described) > 1:
        raise CacheError(
            "The shards hold different augmented views (number, augmentation or seed); rerun "
            "`make features` for every shard with the same AUG_VIEWS and AUG_* settings. Received: "
            + ", ".join(f"{s.path.name}: {s.num_views} views" for s in sets)
            + "."
        )
    num_views = sets[0].num_views
    if not num_views:
        return None
    parts = [(s.splits[VIEWS_SPLIT], load_views(s, num_views)) for s in sets]
    order = np.argsort(np.concatenate([train.index for train, _ in parts]), kind="stable")
    index = np.concatenate([train.index for train, _ in parts])[order]
    labels = np.concatenate([train.labels for train, _ in parts])[order]
    chunks = [
        (np.concatenate([views[v] for _, views in parts])[order], labels, index, np.full(len(index), v, np.int64))
        for v in range(num_views)
    ]
    attrs = {k: v for k, v in sets[0].view_attrs.items() if k not in ("bytes", "bytes_per_view")}
    attrs["seconds"] = round(sum(float(s.view_attrs.get("seconds", 0.0)) for s in sets), 3)
    attrs["seconds_per_view"] = round(attrs["seconds"] / num_views, 3)
    return chunks, attrs
