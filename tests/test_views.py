"""Augmented views in the feature cache: contents, reproducibility, extension, resumption, heads."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, make_folder
from test_extract import tiny_config

from pipeline.augment import example_augmenter
from pipeline.cli import main
from pipeline.config import AugmentConfig, HeadConfig, ViewsConfig
from pipeline.errors import ConfigError
from pipeline.features.extract import extract_features
from pipeline.features.extractor import build_extractor
from pipeline.features.incremental import StoreSink
from pipeline.features.scan import view_key
from pipeline.features.sources import stratified_rows
from pipeline.features.store import load_views, read_content_ids, read_features
from pipeline.heads.dense import DenseHead
from pipeline.heads.logistic import LogisticHead
from pipeline.heads.train import train_head
from pipeline.images import Resize, decode_and_resize

VIEWS = ViewsConfig(num_views=2, augment=AugmentConfig(flip="horizontal", rotation=0.1, zoom=0.1))


@pytest.fixture(scope="module")
def with_views(tmp_path_factory):
    """A 2-class folder (12 images a class: 6 train each) extracted with 2 views."""
    root = tmp_path_factory.mktemp("views")
    folder = make_folder(root / "images", 12)
    config = tiny_config(folder, root / "features")
    result = extract_features(config, views=VIEWS, progress=False)
    return folder, config, result


def test_views_are_features_of_augmented_train_images_with_their_source(with_views):
    folder, _, result = with_views
    cached = read_features(result.path)
    train = cached.splits["train"]
    views = load_views(cached, 2)
    assert views.shape == (2, 12, 32) and cached.num_views == 2
    # The stored columns name each view's source example, view number and label.
    with h5py.File(result.path) as f:
        group = f["train/views"]
        assert group["index"][:].tolist() == train.index.tolist() * 2
        assert group["view"][:].tolist() == [0] * 12 + [1] * 12
        assert group["labels"][:].tolist() == train.labels.tolist() * 2
        assert "views" not in f["validation"] and "views" not in f["test"]  # never augmented
        assert [k for k in f if k not in ("train", "validation", "test")] == []
    # Each view is the backbone applied to that image after the shared augmentation layers.
    model = build_extractor("tiny", image_size=32, weights=None)
    augment = example_augmenter(VIEWS.augment, seed=VIEWS.seed)
    for view in (0, 1):
        images = tf.stack(
            [
                augment(decode_and_resize(tf.io.read_file(str(folder / i)), Resize(32)), view, tf.constant(k, tf.int64))
                for i, k in zip(train.ids, [view_key(c) for c in read_content_ids(result.path, "train")])
            ]
        )
        np.testing.assert_allclose(model(images, training=False).numpy(), views[view], atol=1e-5)
    # They differ from the plain features and from each other.
    assert not np.allclose(views[0], train.features, atol=1e-3)
    assert not np.allclose(views[0], views[1], atol=1e-3)
    attrs = cached.view_attrs
    assert (attrs["num_views"], attrs["seed"], attrs["augment"]) == (2, 0, VIEWS.augment.to_dict())
    assert ViewsConfig.from_dict(attrs["config"]) == VIEWS
    assert attrs["seconds_per_view"] > 0 and attrs["bytes_per_view"] > 0
    assert "2 augmented views per train image" in result.summary() and "per view" in result.summary()


def test_the_example_augmenter_applies_the_shared_layers_per_example():
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (8, 8, 3)), tf.float32)
    flip = example_augmenter(AugmentConfig(flip="horizontal", rotation=0.0), seed=0)
    outputs = [flip(image, 0, tf.constant(p, tf.int64)).numpy() for p in range(16)]
    flipped = [np.array_equal(out, image.numpy()[:, ::-1]) for out in outputs]
    assert all(f or np.array_equal(out, image.numpy()) for f, out in zip(flipped, outputs))
    assert 0 < sum(flipped) < 16  # a fair coin per example
    rotate = example_augmenter(AugmentConfig(flip="none", rotation=0.1), seed=0)
    first = rotate(image, 0, tf.constant(3, tf.int64)).numpy()
    np.testing.assert_array_equal(rotate(image, 0, tf.constant(3, tf.int64)).numpy(), first)  # stateless
    assert not np.allclose(rotate(image, 1, tf.constant(3, tf.int64)).numpy(), first)  # another view
    assert not np.allclose(rotate(image, 0, tf.constant(4, tf.int64)).numpy(), first)  # another example


def _view_images(config, batch_size: int, view: int) -> np.ndarray:
    """The augmented train images of `view` as the extraction pipeline batches them."""
    from pipeline.augment import example_augmenter
    from pipeline.features.batches import view_batches
    from pipeline.features.data import load_source
    from pipeline.features.forward import BURSTS

    split = load_source(config.data, seed=config.seed).splits["train"]
    augment = example_augmenter(VIEWS.augment, seed=VIEWS.seed)
    batches = view_batches(
        split,
        keep=np.arange(split.total),
        resize=Resize(32),
        batch_size=batch_size,
        augment=augment,
        view=view,
        schedule=BURSTS,
    )
    return np.concatenate([images.numpy() for images, *_ in batches])


def test_views_are_reproducible_for_a_seed_whatever_the_batch_size(with_views, tmp_path):
    """The guarantee that holds on every CPU (docs/views.md).

    The augmented image of view v of example p is a pure function of (SEED, v, p): bit for bit the same
    whatever the batch size. Its features come from the backbone's batched kernels, whose blocking (oneDNN on
    CPUs, cuDNN on GPUs) depends on the batch size, so across batch sizes they agree to float rounding
    (differences of 1e-7 seen on CPUs without AVX-512), and with the same batch size they are bit-identical.
    """
    folder, config, result = with_views
    reference = load_views(read_features(result.path), 2)
    for view in (0, 1):
        np.testing.assert_array_equal(_view_images(config, 5, view), _view_images(config, config.batch_size, view))
    again = extract_features(
        dataclasses.replace(config, batch_size=5, output_dir=str(tmp_path / "a")), views=VIEWS, progress=False
    )
    np.testing.assert_allclose(load_views(read_features(again.path), 2), reference, rtol=1e-5, atol=1e-5)
    same = extract_features(dataclasses.replace(config, output_dir=str(tmp_path / "same")), views=VIEWS, progress=False)
    np.testing.assert_array_equal(load_views(read_features(same.path), 2), reference)
    other_seed = extract_features(
        dataclasses.replace(config, output_dir=str(tmp_path / "b")),
        views=dataclasses.replace(VIEWS, seed=1),
        progress=False,
    )
    assert not np.allclose(load_views(read_features(other_seed.path), 2), reference, atol=1e-3)


def test_views_are_added_to_a_finished_file_without_recomputing_its_features(with_views, tmp_path):
    folder, config, result = with_views
    config = dataclasses.replace(config, output_dir=str(tmp_path))
    plain = extract_features(config, progress=False)
    before = read_features(plain.path)
    added = extract_features(config, views=dataclasses.replace(VIEWS, num_views=1), progress=False)
    assert (added.images, added.view_images) == (0, 12) and "plain features kept" in added.summary()
    more = extract_features(config, views=VIEWS, progress=False)
    assert (more.images, more.view_images) == (0, 12)  # only the new view
    after = read_features(more.path)
    for name, split in before.splits.items():
        np.testing.assert_array_equal(after.splits[name].features, split.features)
        np.testing.assert_array_equal(after.splits[name].ids, split.ids)
    # Equal to a file extracted with both views at once: each view is made in the same batches.
    np.testing.assert_array_equal(load_views(after, 2), load_views(read_features(result.path), 2))
    assert extract_features(config, views=dataclasses.replace(VIEWS, num_views=1), progress=False).up_to_date
    assert extract_features(config, progress=False).up_to_date and read_features(more.path).num_views == 2
    # Views of another augmentation have a store of their own: switching back computes nothing.
    other = extract_features(
        config, views=ViewsConfig(num_views=2, augment=AugmentConfig(rotation=0.2)), progress=False
    )
    assert (other.images, other.view_images) == (0, 24)
    back = extract_features(config, views=VIEWS, progress=False)
    assert (back.images, back.view_images) == (0, 0) and not back.up_to_date
    np.testing.assert_array_equal(load_views(read_features(back.path), 2), load_views(after, 2))


def _views_committed(out) -> int:
    """Committed rows of the views store segment being written under `out`."""
    for partial in sorted(out.glob("store/*/views__*/segment-*.h5.partial")):
        try:
            with h5py.File(partial, "r", swmr=True, libver="latest") as f:
                return int(f["rows/committed"][0])
        except (OSError, KeyError):
            return 0
    return 0


def test_views_added_to_a_file_resume_after_kill_9(tmp_path):
    folder = make_folder(tmp_path / "images", 30)  # 60 images, 30 for train
    views = ViewsConfig(num_views=4)
    reference = load_views(
        read_features(
            extract_features(tiny_config(folder, tmp_path / "ref", batch_size=2), views=views, progress=False).path
        ),
        4,
    )
    out = tmp_path / "features"
    config = tiny_config(folder, out, batch_size=2)
    path = extract_features(config, progress=False).path
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--batch-size",
        "2",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--output-dir",
        str(out),
        "--no-progress",
        "--aug-views",
        "4",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _views_committed(out) < 40:  # inside the second view
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "views extraction did not start"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    saved = _views_committed(out)
    assert 40 <= saved < 120
    assert read_features(path).num_views == 0  # the finished file is untouched meanwhile
    resumed = extract_features(config, views=views, progress=False)
    assert (resumed.images, resumed.view_images) == (0, 120 - saved)  # no finished batch computed twice
    np.testing.assert_array_equal(load_views(read_features(resumed.path), 4), reference)
    assert not list(out.glob("store/**/*.partial"))


def test_an_interrupted_run_with_views_resumes_in_the_views(image_folder, tmp_path, monkeypatch):
    config = tiny_config(image_folder, tmp_path, batch_size=2)
    # The same batch size: a resumed run forms the same batches, so it is bit-identical (see above).
    reference = extract_features(tiny_config(image_folder, tmp_path / "ref", batch_size=2), views=VIEWS, progress=False)
    original, calls = StoreSink.append_views, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # inside view 1 (6 batches of 2 per view)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreSink, "append_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(config, views=VIEWS, progress=False)
    monkeypatch.setattr(StoreSink, "append_views", original)
    assert _views_committed(tmp_path) == 14  # the 7 batches of 2 before the interruption
    resumed = extract_features(config, views=VIEWS, progress=False)
    assert (resumed.images, resumed.view_images) == (0, 10)
    cached, expected = read_features(resumed.path), read_features(reference.path)
    np.testing.assert_array_equal(load_views(cached, 2), load_views(expected, 2))
    np.testing.assert_array_equal(cached.splits["train"].features, expected.splits["train"].features)
    assert cached.view_attrs["seconds"] > 0


def test_sharded_runs_fill_the_views_store_of_a_one_process_run(with_views, tmp_path):
    folder, config, result = with_views
    shards = [
        extract_features(
            dataclasses.replace(config, shard_index=i, num_shards=2, output_dir=str(tmp_path)),
            views=VIEWS,
            progress=False,
        )
        for i in range(2)
    ]
    assert sum(s.view_images for s in shards) == 24
    whole = extract_features(dataclasses.replace(config, output_dir=str(tmp_path)), views=VIEWS, progress=False)
    assert (whole.images, whole.view_images) == (0, 0)
    merged, reference = read_features(whole.path), read_features(result.path)
    # Shards batch other examples together: equal to float rounding (see the batch-size test above).
    np.testing.assert_allclose(load_views(merged, 2), load_views(reference, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged.splits["train"].index, reference.splits["train"].index)


def test_bad_views_settings_are_one_line_errors(with_views, tmp_path, capsys):
    with pytest.raises(ConfigError, match="need at least one augmentation"):
        ViewsConfig(num_views=2, augment=AugmentConfig(flip="none", rotation=0.0))
    with pytest.raises(ConfigError, match="num_views must be >= 0"):
        ViewsConfig(num_views=-1)
    folder, _, result = with_views
    flags = [
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--output-dir",
        str(result.path.parent),
    ]
    assert main(["features", *flags, "--aug-views", "2", "--aug-flip", "none", "--aug-rotation", "0"]) == 2
    assert main(["head", *flags, "--head", "dense", "--views", "3", "--runs-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("error: Augmented views need at least one augmentation")
    assert errors[1].startswith("error: Asked to train on 3 augmented views, but the feature file has only 2")
    assert "make features AUG_VIEWS=3" in errors[1]


def test_heads_train_on_views(with_views, tmp_path):
    _, _, result = with_views
    runs = str(tmp_path / "runs")
    dense = train_head(result.path, HeadConfig(head="dense", epochs=3, runs_dir=runs, grid_images=0))
    assert dense.metrics["views"]["used"] == 2 and dense.head.params_["n_views"] == 2  # the dense default
    assert "2 augmented views (sampled per example per epoch)" in dense.summary()
    again = train_head(result.path, HeadConfig(head="dense", epochs=3, runs_dir=str(tmp_path / "again"), grid_images=0))
    assert again.head.history_ == dense.head.history_  # the same seed draws the same views
    off = train_head(result.path, HeadConfig(head="dense", epochs=3, views=0, runs_dir=runs, grid_images=0))
    assert off.head.params_["n_views"] == 0 and off.run_dir.name.endswith("__dense__views-0")
    assert off.head.history_ != dense.head.history_
    logistic = train_head(result.path, HeadConfig(runs_dir=runs, grid_images=0))
    assert logistic.head.params_["n_views"] == 0  # opt-in for logistic
    stacked = train_head(result.path, HeadConfig(views=1, runs_dir=runs, grid_images=0))
    assert stacked.head.params_["n_train_rows"] == 24 and stacked.head.params_["n_train"] == 12
    record = json.loads((stacked.run_dir / "config.json").read_text())["views"]
    assert (record["used"], record["available"], record["augment"]) == (1, 2, VIEWS.augment.to_dict())


def test_a_head_asked_for_views_of_a_file_without_views_is_an_error(with_views, tmp_path):
    _, config, _ = with_views
    plain = extract_features(dataclasses.replace(config, output_dir=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="feature file has no views. Run `make features AUG_VIEWS=1`"):
        train_head(plain.path, HeadConfig(views=1, runs_dir=str(tmp_path / "runs")))
    run = train_head(plain.path, HeadConfig(head="dense", epochs=2, runs_dir=str(tmp_path / "runs"), grid_images=0))
    assert run.metrics["views"] == {"used": 0}


def test_a_finished_dense_run_is_retrained_when_the_file_gains_views(with_views, tmp_path):
    _, config, _ = with_views
    config = dataclasses.replace(config, output_dir=str(tmp_path))
    head = HeadConfig(head="dense", epochs=2, runs_dir=str(tmp_path / "runs"), grid_images=0)
    path = extract_features(config, progress=False).path
    assert not train_head(path, head).up_to_date
    assert train_head(path, head).up_to_date
    extract_features(config, views=dataclasses.replace(VIEWS, num_views=1), progress=False)
    run = train_head(path, head)
    assert not run.up_to_date and run.metrics["views"]["used"] == 1
    extract_features(config, views=VIEWS, progress=False)
    assert not train_head(path, head).up_to_date  # the default now means 2 views
    assert train_head(path, dataclasses.replace(head, views=1)).metrics["views"]["available"] == 2
    assert train_head(path, dataclasses.replace(head, views=1)).up_to_date  # its first view did not change


def test_the_dense_head_draws_a_fresh_version_of_each_example_every_epoch():
    X = np.stack([np.arange(64), np.zeros(64)], axis=1).astype(np.float32)  # row r: [r, 0]
    views = np.stack([X + [0, 1], X + [0, 2]]).astype(np.float32)  # view v of row r: [r, v + 1]
    y = np.arange(64) % 2
    dataset = DenseHead(batch_size=16, seed=3)._view_dataset(X, views, (y.astype(np.float32),))
    epochs = []
    for _ in range(2):
        batches = [(features.numpy(), labels.numpy()) for features, labels in dataset]
        features = np.concatenate([f for f, _ in batches])
        row, version = features[:, 0].astype(int), features[:, 1].astype(int)
        assert sorted(row.tolist()) == list(range(64))  # an epoch is one pass over the examples
        assert np.concatenate([lab for _, lab in batches]).tolist() == y[row].tolist()
        epochs.append(version[np.argsort(row)])
    assert set(np.concatenate(epochs).tolist()) == {0, 1, 2}  # the plain features and both views
    assert (epochs[0] != epochs[1]).mean() > 0.3  # drawn afresh each epoch


def test_logistic_stacks_views_as_rows_with_their_labels():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    views = np.stack([X + rng.normal(0, 0.1, X.shape).astype(np.float32) for _ in range(3)])
    head = LogisticHead(C=1.0).fit(X, y, views=views)
    assert head.params_["n_train_rows"] == 160 and head.params_["n_views"] == 3
    with pytest.raises(Exception, match=r"views must have shape \(V, 40, 4\)"):
        LogisticHead(C=1.0).fit(X, y, views=views[:, :10])


def test_train_per_class_is_a_seeded_stratified_subset(with_views, tmp_path):
    labels, index = np.array([0] * 10 + [1] * 6), np.arange(16)
    rows = stratified_rows(labels, index, 4, ["cat", "dog"], seed=0)
    assert np.bincount(labels[rows]).tolist() == [4, 4] and rows.tolist() == sorted(rows.tolist())
    assert rows.tolist() == stratified_rows(labels, index, 4, ["cat", "dog"], seed=0).tolist()
    assert rows.tolist() != stratified_rows(labels, index, 4, ["cat", "dog"], seed=1).tolist()
    # The choice follows the examples' split index, not their rows: without an
    # unchosen example (as when the cache skipped it) the same examples are picked.
    dropped = next(i for i in range(16) if i not in rows)
    keep = index != dropped
    again = stratified_rows(labels[keep], index[keep], 4, ["cat", "dog"], seed=0)
    assert index[keep][again].tolist() == index[rows].tolist()
    with pytest.raises(
        ConfigError, match="TRAIN_PER_CLASS=7 needs that many train examples in every class. Received: dog: 6"
    ):
        stratified_rows(labels, index, 7, ["cat", "dog"], seed=0)
    _, _, result = with_views
    run = train_head(
        result.path, HeadConfig(head="dense", epochs=2, train_per_class=3, runs_dir=str(tmp_path), grid_images=0)
    )
    assert run.metrics["train_examples"] == 6 and run.head.params_["n_views"] == 2
    assert run.run_dir.name.endswith("__dense__3-per-class") and "3 train examples per class" in run.summary()
