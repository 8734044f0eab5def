"""One writer per output: the lock module, and two real CLI processes on the same output.

No assertion depends on timing: the test process holds the lock itself
(`pipeline.locks.exclusive`), starts the CLI processes, waits until each one has
said that it waits for this process, and only then releases the lock.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import filelock
import pytest
from conftest import ROOT, assert_same_rows, make_folder
from test_extract import tiny_config

from pipeline import locks
from pipeline.config import HeadConfig
from pipeline.errors import LockError
from pipeline.features.extract import extract_features, resolve, store_path
from pipeline.features.store import partial_path, read_features
from pipeline.heads.train import train_head
from pipeline.locks import Holder, exclusive, holder_path, is_lock_file, lock_path
from pipeline.runs import run_dir_for

#: A hang guard only: the processes below normally get there in seconds.
DEADLINE = 300
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


class Process:
    """A subprocess whose stderr is read line by line as it comes."""

    def __init__(self, command: list[str]):
        self.popen = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stderr:
            self.stderr.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str) -> str:
        """The first stderr line containing `text`; fails if the process ends without one."""
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {text!r} within {DEADLINE} s; stderr so far:\n{''.join(self.stderr)}")
            if line is None:
                pytest.fail(f"ended without {text!r}:\n{''.join(self.stderr)}")
            if text in line:
                return line

    def finish(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the process ends."""
        stdout = self.popen.stdout.read()
        self.popen.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        return self.popen.returncode, stdout, "".join(self.stderr)


def cli(*args: str) -> Process:
    return Process([sys.executable, "-m", "pipeline", *args])


def feature_flags(folder, out) -> list[str]:
    """The CLI flags of `tiny_config(folder, out)`."""
    return [
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
        str(out),
        "--no-progress",
    ]


# ------------------------------------------------------------------ the module
def test_the_holder_is_recorded_while_held_and_the_lock_file_stays(tmp_path):
    path = tmp_path / "out" / "f.h5"
    with exclusive(path, what="feature file") as me:
        assert Holder.read(path) == me
        assert me.pid == os.getpid() and me.host == socket.gethostname() and me.command
    assert Holder.read(path) is None and not holder_path(path).exists()
    assert lock_path(path).exists()  # empty and harmless; deleting it would race with waiters
    assert is_lock_file(lock_path(path)) and is_lock_file(holder_path(path)) and not is_lock_file(path)
    assert lock_path(tmp_path / "out") == tmp_path / "out.lock"  # a folder's lock is beside it


def test_a_second_acquirer_waits_and_names_the_holder(tmp_path):
    path = tmp_path / "f.h5"
    script = textwrap.dedent(f"""
        import logging
        from pipeline.locks import exclusive
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        with exclusive({str(path)!r}, what="feature file"):
            print("acquired", flush=True)
    """)
    with exclusive(path, what="feature file") as me:
        other = Process([sys.executable, "-c", script])
        line = other.wait_for("waiting")
        assert line.startswith("WARNING Feature file") and str(path) in line
        assert f"PID {os.getpid()} on {me.host}, since {me.since}" in line
        assert other.popen.poll() is None  # still waiting: this process holds the lock
    returncode, stdout, stderr = other.finish()
    assert returncode == 0 and stdout == "acquired\n"
    assert stderr.count("is being written by another run") == 1 and "the other run finished" in stderr


def test_a_stale_holder_record_is_not_reported(tmp_path, monkeypatch):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Holder(pid=int(done.stdout), host=socket.gethostname(), command="killed", since="earlier")
    path = tmp_path / "f.h5"
    holder_path(path).write_text(json.dumps(dead.__dict__))
    assert Holder.read(path) == dead and not dead.alive()
    monkeypatch.setattr(locks, "_HOLDER_GRACE_SECONDS", 0.0)
    assert locks._wait_for_holder(path) is None


class RefusedLock:
    """A FileLock whose filesystem refuses it, as a read-only folder or an NFS mount without locking does."""

    def __init__(self, path, *args, **kwargs):
        pass

    def acquire(self, *args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")


def test_a_refused_lock_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(filelock, "FileLock", RefusedLock)
    with pytest.raises(
        LockError, match=r"Expected to lock .*f\.h5\.lock .*refused \(\[Errno \d+\] No locks available\)"
    ):
        with exclusive(tmp_path / "f.h5"):
            pytest.fail("entered without the lock")


def test_a_read_only_folder_is_only_read_without_a_lock(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(filelock, "FileLock", RefusedLock)
    monkeypatch.setattr(locks.os, "access", lambda path, mode: False)  # root can write anywhere
    with exclusive(tmp_path / "f.h5", what="feature file") as me:
        assert me is None
    assert "is read-only for this run, so it is not locked" in caplog.text


# --------------------------------------------------------- two real processes
def test_two_features_runs_of_one_key_give_one_file(tmp_path):
    folder = make_folder(tmp_path / "images", 8)
    out = tmp_path / "features"
    config, key, path = resolve(tiny_config(folder, out))
    with exclusive(store_path(config, key), what="feature store"):
        runs = [cli("features", *feature_flags(folder, out)) for _ in range(2)]
        # A one-process run to compare with, made while the two start up.
        reference = read_features(extract_features(tiny_config(folder, tmp_path / "one"), progress=False).path)
        for run in runs:
            assert f"PID {os.getpid()}" in run.wait_for("waiting")
    results = [run.finish() for run in runs]
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    summaries = sorted(r[1].strip().splitlines()[-1] for r in results)
    assert summaries[0].startswith("features: 16 extracted, 0 reused, 0 skipped")  # exactly one extracted
    assert summaries[1] == f"features: up to date, nothing to do (16 rows): {path}"  # the other found it finished
    assert not holder_path(store_path(config, key)).exists()
    assert [p.name for p in out.glob("*.h5*")] == [path.name]  # the converted model sits in runtimes/
    assert not list(out.glob("store/**/*.partial"))

    written = read_features(path)
    assert_same_rows(written, reference)


def test_two_head_runs_of_one_run_directory_train_once(tmp_path):
    folder = make_folder(tmp_path / "images", 8)
    features = extract_features(tiny_config(folder, tmp_path / "features"), progress=False).path
    config = HeadConfig(runs_dir=str(tmp_path / "runs"), grid_images=0)
    run_dir = run_dir_for(features, config)
    flags = [*feature_flags(folder, tmp_path / "features"), "--runs-dir", config.runs_dir, "--grid-images", "0"]
    with exclusive(run_dir, what="run directory"):
        runs = [cli("head", *flags) for _ in range(2)]
        reference = train_head(features, HeadConfig(runs_dir=str(tmp_path / "one"), grid_images=0))
        for run in runs:
            assert f"PID {os.getpid()}" in run.wait_for("waiting")
    results = [run.finish() for run in runs]
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    summaries = [r[1].strip().splitlines()[-1] for r in results]
    assert sum("(up to date, not retrained)" in s for s in summaries) == 1  # exactly one trained
    assert all(s.startswith("head: logistic") and s.endswith(str(run_dir)) for s in summaries)
    assert sorted(p.name for p in run_dir.parent.iterdir() if not is_lock_file(p)) == [run_dir.name]  # no temp dirs

    written = json.loads((run_dir / "metrics.json").read_text())
    for split in ("validation", "test"):
        got, want = written[split], reference.metrics[split]
        assert (got["accuracy"], got["confusion_matrix"]) == (want["accuracy"], want["confusion_matrix"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert written["hyperparameters"]["C"] == reference.metrics["hyperparameters"]["C"]


def test_ctrl_c_while_waiting_exits_as_interrupted_and_writes_nothing(tmp_path):
    folder = make_folder(tmp_path / "images", 4)
    out = tmp_path / "features"
    config, key, path = resolve(tiny_config(folder, out))
    with exclusive(store_path(config, key), what="feature store"):
        run = cli("features", *feature_flags(folder, out))
        run.wait_for("waiting")
        run.popen.send_signal(signal.SIGINT)
        returncode, stdout, stderr = run.finish()
    assert returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not path.exists() and not partial_path(path).exists()


def test_without_waiting_a_held_lock_is_one_line_naming_the_holder(tmp_path):
    target = tmp_path / "decisions.csv"
    with locks.exclusive(target, what="decisions file"):
        with pytest.raises(LockError, match=r"Decisions file .* is in use by another process \(PID \d+") as err:
            with locks.exclusive(target, what="decisions file", wait=False):
                pass
        assert "\n" not in str(err.value)
    with locks.exclusive(target, wait=False):  # released: taken at once
        pass
