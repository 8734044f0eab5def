"""ENGINE=ray: the same feature file as a one-process run, through worker and driver faults.

One local Ray cluster (2 CPUs) serves the whole session; workers are the real
`ExtractionWorker` or the stand-ins of tests/ray_workers.py with one fault each.
Shards of 8 images make many shards out of a few dozen images.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, make_folder

from pipeline.config import AugmentConfig, DataConfig, EngineConfig, FeaturesConfig, ViewsConfig
from pipeline.errors import ConfigError, WorkerError
from pipeline.features.engines import get_engine
from pipeline.features.extract import extract_features, resolve
from pipeline.features.sources import scan_folder
from pipeline.features.store import load_views, read_features

TESTS = Path(__file__).resolve().parent
VIEWS = ViewsConfig(num_views=2, augment=AugmentConfig(flip="horizontal", rotation=0.1))
SHARD = 8


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster for the session; its workers can import tests/ray_workers.py."""
    ray = pytest.importorskip("ray")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(ROOT), previous) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def config_for(folder: Path, out: Path, **kwargs) -> FeaturesConfig:
    data = DataConfig(dataset=None, data_dir=str(folder), val_fraction=0.25, test_fraction=0.25)
    return FeaturesConfig(data=data, backbone="tiny", weights="none", batch_size=4, output_dir=str(out), **kwargs)


def ray_engine(
    workers: int = 2, worker: str | None = None, *, address: str | None = None, max_attempts: int = 3, **worker_kwargs
):
    """The Ray engine with shards of 8 images, with a stand-in worker from tests/ray_workers.py if named."""
    from pipeline.features.ray_engine import RayEngine

    config = EngineConfig(name="ray", address=address, workers=workers, shard_size=SHARD, max_attempts=max_attempts)
    if worker is None:
        return RayEngine(config)
    import ray_workers

    return RayEngine(config, worker=getattr(ray_workers, worker), worker_kwargs=worker_kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A folder of 2 x 40 images and one unreadable file, and its one-process file with 2 views."""
    root = tmp_path_factory.mktemp("distributed")
    folder = make_folder(root / "images", 40)
    (folder / "dog" / "dog.broken.jpg").write_bytes(b"not an image")
    result = extract_features(config_for(folder, root / "local"), views=VIEWS, progress=False)
    return folder, result.path


def views_of(folder: Path) -> int:
    """The views a run computes: of each readable train image (the carve puts the broken file in some split)."""
    train = scan_folder(config_for(folder, folder).data, seed=0).splits["train"]
    return VIEWS.num_views * sum(not path.endswith(".broken.jpg") for path, _ in train)


def assert_same_file(path: Path, expected: Path) -> None:
    """Same name, rows, ids, labels, attributes and views; features to float tolerance."""
    assert path.name == expected.name
    got, want = read_features(path), read_features(expected)
    volatile = {"created", "config"}  # `config` differs only by its output_dir here
    assert {k: v for k, v in got.attrs.items() if k not in volatile} == {
        k: v for k, v in want.attrs.items() if k not in volatile
    }
    assert dataclasses.replace(FeaturesConfig.from_dict(got.config), output_dir="") == dataclasses.replace(
        FeaturesConfig.from_dict(want.config), output_dir=""
    )
    assert got.split_attrs == want.split_attrs  # including the skipped images and their reasons
    assert list(got.splits) == list(want.splits)
    for name, split in want.splits.items():
        np.testing.assert_array_equal(got.splits[name].ids, split.ids)
        np.testing.assert_array_equal(got.splits[name].labels, split.labels)
        np.testing.assert_array_equal(got.splits[name].index, split.index)
        np.testing.assert_allclose(got.splits[name].features, split.features, atol=1e-5)
    assert got.num_views == want.num_views
    if want.num_views:
        views = {k: v for k, v in got.view_attrs.items() if k not in ("seconds", "seconds_per_view")}
        assert views == {k: v for k, v in want.view_attrs.items() if k not in ("seconds", "seconds_per_view")}
        np.testing.assert_allclose(load_views(got, want.num_views), load_views(want, want.num_views), atol=1e-5)


def test_a_ray_run_writes_the_file_of_a_one_process_run(ray_cluster, reference, tmp_path):
    folder, expected = reference
    engine = ray_engine(workers=2)
    result = extract_features(config_for(folder, tmp_path), views=VIEWS, progress=False, engine=engine)
    assert (result.images, result.skipped, result.view_images) == (80, 1, views_of(folder))
    assert_same_file(result.path, expected)
    assert engine.startup_seconds > 0
    # A finished file is up to date for either engine, without starting anything.
    again = extract_features(config_for(folder, tmp_path), views=VIEWS, progress=False, engine=ray_engine())
    assert again.up_to_date


def test_a_ray_run_of_a_tfds_dataset_equals_a_one_process_run(ray_cluster, dummy_tfds_dir, tmp_path):
    data = DataConfig(
        dataset="dummy_mnist",
        tfds_dir=str(dummy_tfds_dir),
        splits={"train": "train[:60%]", "validation": "train[60%:]", "test": "test"},
    )
    config = FeaturesConfig(data=data, backbone="tiny", weights="none", batch_size=4)
    local = extract_features(dataclasses.replace(config, output_dir=str(tmp_path / "local")), progress=False)
    ray_run = extract_features(
        dataclasses.replace(config, output_dir=str(tmp_path / "ray")), progress=False, engine=ray_engine(workers=1)
    )
    assert ray_run.images == 40
    assert_same_file(ray_run.path, local.path)


@pytest.mark.parametrize(
    "kill",
    [
        (13, None),
        pytest.param((21, 1), marks=pytest.mark.slow),
    ],
    ids=["train-shard", "views-shard"],
)
def test_a_killed_worker_is_restarted_and_the_file_is_the_same(ray_cluster, reference, tmp_path, kill):
    """A worker process is killed (SIGKILL) in the middle of a train shard, or of a shard of view 1.

    `chunk_bytes=1` sends every batch on its own, so the retry resumes mid-shard.
    """
    folder, expected = reference
    engine = ray_engine(workers=2, worker="KillOnceWorker", markers=str(tmp_path), kills=[kill], chunk_bytes=1)
    result = extract_features(config_for(folder, tmp_path / "features"), views=VIEWS, progress=False, engine=engine)
    assert [p.name for p in tmp_path.glob("killed-*")] == [f"killed-{kill[1]}-{kill[0]}"]
    assert engine.failures == 1
    assert_same_file(result.path, expected)


def test_a_shard_that_keeps_failing_is_named_with_its_first_failing_image(ray_cluster, tmp_path):
    folder = make_folder(tmp_path / "images", 20)  # 20 train images: shards of records 0-7, 8-15, 16-19
    config = config_for(folder, tmp_path / "features")
    engine = ray_engine(workers=2, worker="PoisonWorker", record=13, max_attempts=2, chunk_bytes=1)
    with pytest.raises(WorkerError) as caught:
        extract_features(config, progress=False, engine=engine)
    message = str(caught.value)
    # Records 8-11 of shard 1 arrived (batches of 4), so the batch from record 12 is the one that failed.
    first = scan_folder(config.data, seed=0).splits["train"][12][0]
    assert message.startswith("shard 1 of split 'train' (records 12-15) failed 2 times")
    assert f"the first image it could not deliver is {first} (split position 12)" in message
    assert "decoder crashed on record 13" in message and "\n" not in message
    # Nothing assembled; rows committed before the failure (if any) stay in the store's partial segment.
    assert not resolve(config)[2].exists()


def test_a_user_error_in_a_worker_is_the_one_line_error_itself(ray_cluster, image_folder, tmp_path):
    """The backbone is built in the workers: its errors reach the driver as themselves, not as Ray's."""
    config = config_for(image_folder, tmp_path, image_size=8)  # the tiny backbone needs 16 px
    with pytest.raises(ConfigError) as caught:
        extract_features(config, progress=False, engine=ray_engine(workers=1))
    assert str(caught.value).startswith("Backbone 'tiny' needs images of at least 16x16 pixels")
    assert "\n" not in str(caught.value)


DRIVER = """
import sys
sys.path[:0] = [{tests!r}]
from pathlib import Path
from test_distributed import config_for, ray_engine
from pipeline.features.extract import extract_features
engine = ray_engine(workers=2, worker="SlowWorker", address={address!r}, delay=0.2)
extract_features(config_for(Path({folder!r}), Path({out!r})), progress=False, engine=engine)
"""


def _committed(out: Path) -> int:
    """Committed rows of the store segment another process writes under `out` (0 before it starts)."""
    for partial in out.glob("store/*/segment-*.h5.partial"):
        try:
            with h5py.File(partial, "r", swmr=True, libver="latest") as f:
                return int(f["rows/committed"][0])
        except (OSError, KeyError, ValueError):
            return 0
    return 0


@pytest.mark.slow
def test_a_rerun_after_the_driver_is_killed_computes_no_finished_shard(ray_cluster, reference, tmp_path):
    folder, expected = reference
    out = tmp_path / "features"
    script = DRIVER.format(tests=str(TESTS), address=ray_cluster, folder=str(folder), out=str(out))
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while _committed(out) < 2 * SHARD:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the driver did not start writing"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    saved = _committed(out)
    assert 2 * SHARD <= saved < len(read_features(expected).splits["train"])
    result = extract_features(config_for(folder, out), views=VIEWS, progress=False, engine=ray_engine(workers=2))
    assert (result.images, result.view_images) == (80 - saved, views_of(folder))  # nothing committed computed again
    assert_same_file(result.path, expected)


@pytest.mark.slow
def test_make_features_engine_ray_on_an_existing_cluster(ray_cluster, reference, tmp_path):
    folder, expected = reference
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
        "4",
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
        "--output-dir",
        str(tmp_path),
        "--aug-views",
        "2",
        "--no-progress",
        "--engine",
        "ray",
        "--workers",
        "1",
        "--ray-shard-size",
        str(SHARD),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "features: 80 extracted, 0 reused, 1 skipped" in process.stdout
    assert_same_file(resolve(config_for(folder, tmp_path))[2], expected)


def test_engine_ray_without_ray_installed_is_a_one_line_config_error(monkeypatch, image_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    engine = get_engine(EngineConfig(name="ray"))
    with pytest.raises(ConfigError, match=r"ENGINE=ray needs the ray package.*pip install 'pipeline\[ray\]'"):
        extract_features(config_for(image_folder, tmp_path), progress=False, engine=engine)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"workers": 2}, "WORKERS=2 configure.*ENGINE=ray, but the engine is local"),
        ({"name": "spark"}, "engine must be one of local, ray"),
        ({"name": "ray", "workers": 0}, "workers must be >= 1"),
        ({"name": "ray", "shard_size": 0}, "shard_size must be >= 1"),
    ],
)
def test_engine_settings_are_validated(settings, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**settings)


@pytest.mark.parametrize(
    "settings, resources, placement",
    [
        ({}, {"CPU": 16}, (1, 0.0, 16.0)),
        ({}, {"CPU": 16, "GPU": 4}, (4, 1.0, 4.0)),
        ({"workers": 2}, {"CPU": 2}, (2, 0.0, 1.0)),
        ({"gpus_per_worker": 0.5}, {"CPU": 8, "GPU": 2}, (4, 0.5, 2.0)),
    ],
)
def test_workers_default_to_one_per_gpu_else_one(settings, resources, placement):
    from pipeline.features.ray_engine import RayEngine

    assert RayEngine(EngineConfig(name="ray", **settings))._placement(resources) == placement


def test_more_gpus_than_the_cluster_has_is_an_error():
    from pipeline.features.ray_engine import RayEngine

    with pytest.raises(ConfigError, match="WORKERS=4 x GPUS_PER_WORKER=1 needs 4 GPUs; the Ray cluster has 2"):
        RayEngine(EngineConfig(name="ray", workers=4, gpus_per_worker=1))._placement({"CPU": 8, "GPU": 2})


def test_batches_are_sent_in_chunks_of_about_chunk_bytes():
    from pipeline.features.ray_engine import coalesce

    def batches():
        for a in range(0, 10, 3):  # 4 batches: 3, 3, 3 and 1 rows of 4 float32 features (48 bytes a batch)
            index = np.arange(a, min(10, a + 3))
            yield np.ones((len(index), 4), np.float32), index % 2, index, [b"id-%d" % i for i in index]

    chunks = list(coalesce(batches(), 96))
    assert [len(c[2]) for c in chunks] == [6, 4]  # two batches make 96 bytes; the rest at the end
    assert chunks[0][3] == [b"id-%d" % i for i in range(6)] and chunks[1][2].tolist() == [6, 7, 8, 9]
    assert [len(c[2]) for c in coalesce(batches(), 1)] == [3, 3, 3, 1]


def test_the_driver_ceiling_benchmark_runs_on_stand_in_workers(ray_cluster, tmp_path):
    from pipeline.bench.driver import bench_driver

    rows = bench_driver(rows=3000, dim=8, batch_size=32, work_dir=tmp_path, workers=(1,), shard_size=500)
    assert [r["what"] for r in rows] == [
        "write only, appends of 32 rows (no Ray)",
        "write only, appends of 4 MB (no Ray)",
        "receive only (1 stand-in worker)",
        "receive and write (1 stand-in worker)",
        "finish the file (gzip copy, once per run)",
    ]
    assert all(r["rows"] == 3000 and r["rows_per_s"] > 0 for r in rows)
    with h5py.File(tmp_path / "ray-1.h5") as f:  # the stand-in rows, in order
        assert f["train/index"][:].tolist() == list(range(3000)) and f["train/features"].shape == (3000, 8)
