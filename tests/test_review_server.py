"""The review server's API, without a browser: sections, paging, decisions that persist
across restarts, thumbnails, and the paths and requests it refuses."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline.decisions import read_decisions
from pipeline.errors import ConfigError, LockError
from pipeline.review.server import running


def decisions_of(audit_dir: Path) -> Path:
    """Where the page writes: one file per dataset beside the audit folders, not inside one."""
    return audit_dir.parent / "generated.decisions.csv"


def call(server, method: str, path: str, body=None, headers=None, raw: bool = False):
    """(status, JSON or bytes, headers) of one request sent as is (no client-side path normalizing)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    sent = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers={**sent, **(headers or {})})
    res = conn.getresponse()
    payload = res.read()
    conn.close()
    if not raw and res.getheader("Content-Type", "").startswith("application/json"):
        payload = json.loads(payload)
    return res.status, payload, res


def test_sections_list_the_audits_findings_in_review_order(audit_dir):
    with running(audit_dir) as server:
        status, meta, _ = call(server, "GET", "/api/meta")
        assert status == 200 and meta["class_names"] == ["cat", "dog", "fox"]
        totals = {s["name"]: s["total"] for s in meta["sections"]}
        assert totals["label"] >= 2 and totals["duplicates"] == 1 and totals["leaks"] == 2 and totals["outliers"] >= 1

        _, labels, _ = call(server, "GET", "/api/items?section=label")
        scores = [i["score"] for i in labels["items"]]
        assert scores == sorted(scores)  # worst (lowest margin) first
        member = labels["items"][0]["members"][0]
        assert member["thumb"] == "/thumb/data/" + member["id"] and len(member["sha256"]) == 64
        assert member["decision"] is None and labels["items"][0]["suggested"] != labels["items"][0]["given"]

        _, leaks, _ = call(server, "GET", "/api/items?section=leaks")
        exact = leaks["items"][0]  # exact copies first
        assert exact["match"] == "exact" and exact["splits"] == ["train", "test"]
        assert [m["id"] for m in exact["members"]] == ["train/cat/cat.0.jpg", "test/cat/copy-of-cat.0.jpg"]
        assert exact["members"][0]["sha256"] == exact["members"][1]["sha256"]  # byte-identical: one content hash
        assert exact["members"][0]["audit_excludes"] and not exact["members"][1]["audit_excludes"]

        _, outliers, _ = call(server, "GET", "/api/items?section=outliers")
        assert outliers["items"][0]["context"][0]["role"] == "nearest"


def test_paging_slices_a_section(audit_dir):
    with running(audit_dir) as server:
        _, whole, _ = call(server, "GET", "/api/items?section=leaks&offset=0&limit=50")
        _, second, _ = call(server, "GET", "/api/items?section=leaks&offset=1&limit=1")
        assert second["total"] == 2 and [i["key"] for i in second["items"]] == [whole["items"][1]["key"]]
        _, past, _ = call(server, "GET", "/api/items?section=leaks&offset=10&limit=5")
        assert past["items"] == [] and past["total"] == 2


def test_decisions_are_saved_read_back_and_survive_a_restart(audit_dir):
    with running(audit_dir) as server:
        _, page, _ = call(server, "GET", "/api/items?section=label&limit=2")
        first, second = (item["members"][0] for item in page["items"])
        new_label = next(c for c in ("cat", "dog", "fox") if c != second["label"])
        status, saved, _ = call(
            server, "POST", "/api/decisions", {"id": first["id"], "sha256": first["sha256"], "decision": "exclude"}
        )
        assert status == 200 and saved["decision"]["decision"] == "exclude" and saved["counts"]["exclude"] == 1
        status, _, _ = call(
            server, "POST", "/api/decisions", {"id": second["id"], "decision": "relabel", "label": new_label}
        )
        assert status == 200
        _, listed, _ = call(server, "GET", "/api/decisions")
        assert {(d["path"], d["decision"], d["label"]) for d in listed["decisions"]} == {
            (first["id"], "exclude", ""),
            (second["id"], "relabel", new_label),
        }

    on_disk = read_decisions(decisions_of(audit_dir))
    assert {d.path for d in on_disk.values()} == {first["id"], second["id"]}

    with running(audit_dir) as again:  # a new server: the page shows the saved state
        _, page, _ = call(again, "GET", "/api/items?section=label&limit=2")
        shown = [item["members"][0]["decision"] for item in page["items"]]
        assert [(d["decision"], d["label"]) for d in shown] == [("exclude", ""), ("relabel", new_label)]
        _, meta, _ = call(again, "GET", "/api/meta")
        assert meta["decisions"]["exclude"] == 1 and meta["decisions"]["relabel"] == 1


def test_a_decision_follows_the_image_content_across_a_rename(audit_dir, data_dir, tmp_path):
    moved = Path(shutil.copytree(data_dir, tmp_path / "moved"))
    with running(audit_dir, data_dir=moved) as server:
        assert call(server, "POST", "/api/decisions", {"id": "train/fox/fox.3.jpg", "decision": "exclude"})[0] == 200
    (moved / "train/fox/fox.3.jpg").rename(moved / "train/fox/renamed.jpg")
    with running(audit_dir, data_dir=moved) as server:
        _, page, _ = call(server, "GET", "/api/items?section=leaks")
        fox = next(i for i in page["items"] if i["members"][0]["id"] == "train/fox/fox.3.jpg")
        assert fox["members"][0]["missing"] and fox["members"][0]["decision"] is None  # the old path is gone...
        _, listed, _ = call(server, "GET", "/api/decisions")
        _, saved, _ = call(server, "POST", "/api/decisions", {"id": "train/fox/renamed.jpg", "decision": "keep"})
        assert saved["decision"]["sha256"] == listed["decisions"][0]["sha256"]  # ...the content's decision is not


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"id": "train/cat/cat.1.jpg", "decision": "delete"}, 400, "Expected decision in keep"),
        ({"id": "train/cat/cat.1.jpg", "decision": "relabel", "label": "wolf"}, 400, "Expected a label in the classes"),
        (
            {"id": "train/cat/cat.1.jpg", "decision": "keep", "sha256": "0" * 64},
            409,
            "changed since the page listed it",
        ),
        ({"id": "train/cat/nothing.jpg", "decision": "keep"}, 404, "no file"),
        ({"id": "../features.h5", "decision": "keep"}, 403, "Refused"),
        (["not", "an", "object"], 400, "Expected a JSON object"),
    ],
)
def test_bad_decisions_are_refused_with_one_line(audit_dir, body, status, message):
    with running(audit_dir) as server:
        got, answer, _ = call(server, "POST", "/api/decisions", body)
        assert got == status and message in answer["error"] and "\n" not in answer["error"]
        assert call(server, "GET", "/api/decisions")[1]["decisions"] == []


def test_requests_from_elsewhere_are_refused(audit_dir):
    with running(audit_dir) as server:
        assert call(server, "GET", "/api/meta", headers={"Host": "evil.example:80"})[0] == 403
        assert (
            call(
                server,
                "POST",
                "/api/decisions",
                {"id": "train/cat/cat.1.jpg", "decision": "exclude"},
                headers={"Origin": "http://evil.example"},
            )[0]
            == 403
        )
        status, answer, _ = call(
            server,
            "POST",
            "/api/decisions",
            b"id=train/cat/cat.1.jpg&decision=exclude",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 415 and "application/json" in answer["error"]
        assert call(server, "GET", "/api/items?section=secrets")[0] == 400
        assert call(server, "GET", "/api/items?section=label&limit=x")[0] == 400
        assert call(server, "GET", "/api/decisions")[1]["decisions"] == []


def test_the_page_and_thumbnails_are_served(audit_dir):
    from io import BytesIO

    from PIL import Image

    with running(audit_dir) as server:
        status, page, res = call(server, "GET", "/", raw=True)
        assert status == 200 and b"/app.js" in page and res.getheader("Content-Type").startswith("text/html")
        assert call(server, "GET", "/app.js", raw=True)[0] == 200
        status, jpeg, res = call(server, "GET", "/thumb/data/train/cat/cat.0.jpg?size=100")
        assert status == 200 and res.getheader("Content-Type") == "image/jpeg"
        assert max(Image.open(BytesIO(jpeg)).size) <= 160  # rounded up to the 160 px size, never above
        status, jpeg, _ = call(server, "GET", "/thumb/audit/duplicates.png?size=512")  # a contact sheet
        assert status == 200 and Image.open(BytesIO(jpeg)).format == "JPEG"
        assert call(server, "GET", "/thumb/data/train/cat/none.jpg")[0] == 404
        assert call(server, "GET", "/thumb/elsewhere/x.jpg")[0] == 404
        status, answer, _ = call(server, "GET", "/thumb/audit/audit.json")
        assert status == 415 and "not an image" in answer["error"]


def test_paths_outside_the_folders_are_refused(audit_dir, data_dir, tmp_path):
    outside = tmp_path / "secret.jpg"
    shutil.copyfile(data_dir / "train/cat/cat.0.jpg", outside)
    images = Path(shutil.copytree(data_dir, tmp_path / "images"))
    (images / "train/cat/escape.jpg").symlink_to(outside)
    (images / "train/cat/inside.jpg").symlink_to(images / "train/dog/dog.0.jpg")
    (images / "train/escape-dir").symlink_to(tmp_path)
    with running(audit_dir, data_dir=images) as server:
        refused = [
            "/thumb/data/../secret.jpg",  # '..'
            "/thumb/data/train/../../secret.jpg",
            "/thumb/data/%2E%2E/secret.jpg",  # '..' percent-encoded
            "/thumb/data/" + str(outside),  # absolute: //tmp/...
            "/thumb/data/%2F" + str(outside).lstrip("/").replace("/", "%2F"),
            "/thumb/data/train/cat/escape.jpg",  # symlink to a file outside
            "/thumb/data/train/escape-dir/secret.jpg",  # symlinked folder outside
            "/thumb/data/train\\..\\..\\secret.jpg",
            "/thumb/audit/../audit.json",
        ]
        for path in refused:
            status, answer, _ = call(server, "GET", path)
            assert status == 403, path
            assert answer["error"].startswith("Refused"), path
        assert call(server, "GET", "/thumb/data/train/cat/inside.jpg")[0] == 200  # a symlink within the folder is fine
        status, _, _ = call(server, "POST", "/api/decisions", {"id": "train/cat/escape.jpg", "decision": "exclude"})
        assert status == 403


def test_a_second_server_on_the_same_audit_is_a_one_line_error(audit_dir):
    with running(audit_dir):
        with pytest.raises(LockError, match=r"Decisions file .* is in use by another process \(PID \d+") as err:
            with running(audit_dir):
                pass
        assert "\n" not in str(err.value)


def test_the_command_errors_in_one_line(audit_dir, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["review", "--audit-dir", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Expected an audit of `make audit` in AUDIT_DIR=") and "\n" not in err
    with pytest.raises(ConfigError, match="not a folder now. Move them back, or rerun `make audit`"):
        with running(audit_dir, data_dir=tmp_path / "gone"):
            pass


def test_the_latest_audit_of_a_folder_of_audits_is_served(audit_dir, tmp_path):
    older = Path(shutil.copytree(audit_dir, audit_dir.parent / "older__audit"))
    os.utime(older / "audit.json", (1, 1))
    with running(audit_dir.parent) as server:
        assert call(server, "GET", "/api/meta")[1]["audit"] == str(audit_dir)


def test_only_loopback_is_bound(audit_dir):
    with running(audit_dir, port=0) as server:
        assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        assert os.path.exists(str(decisions_of(audit_dir)) + ".lock")


def test_concurrent_clicks_all_land_as_whole_rows(audit_dir, data_dir):
    from concurrent.futures import ThreadPoolExecutor

    ids = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*.jpg"))[:40]
    with running(audit_dir) as server:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(lambda i: call(server, "POST", "/api/decisions", {"id": i, "decision": "keep"})[0], ids)
            )
    assert statuses == [200] * len(ids)
    lines = decisions_of(audit_dir).read_text().splitlines()
    assert len(lines) == 1 + len(ids) and all(line.count(",") == 4 for line in lines)
    contents = {hashlib.sha256((data_dir / i).read_bytes()).hexdigest() for i in ids}  # copies share one
    assert set(read_decisions(decisions_of(audit_dir))) == contents


def test_the_command_prints_its_url_and_a_killed_server_leaves_no_lock_behind(audit_dir):
    import signal
    import subprocess
    import sys
    import urllib.request

    def start():
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "review", "--audit-dir", str(audit_dir), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline().strip()  # "review: http://127.0.0.1:PORT/  (decisions -> ...)"
        return proc, line.split()[1] if line.startswith("review: ") else line

    proc, url = start()
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        request = urllib.request.Request(
            url + "api/decisions",
            json.dumps({"id": "train/cat/cat.2.jpg", "decision": "exclude"}).encode(),
            {"Content-Type": "application/json"},
        )
        assert json.load(urllib.request.urlopen(request, timeout=10))["decision"]["decision"] == "exclude"
        second = subprocess.run(
            [sys.executable, "-m", "pipeline", "review", "--audit-dir", str(audit_dir), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and second.stdout == ""
        assert "error: Decisions file" in second.stderr and "in use by another process" in second.stderr
        assert len([line for line in second.stderr.splitlines() if line.startswith("error:")]) == 1
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        proc.wait()
    proc, url = start()  # the OS released the lock with the process
    try:
        meta = json.load(urllib.request.urlopen(url + "api/meta", timeout=10))
        assert meta["decisions"]["exclude"] == 1
    finally:
        proc.terminate()
        proc.wait()


def test_ten_thousand_findings_page_quickly(audit_dir):
    """A page costs its own items (their files hashed once, then cached), never the whole section."""
    import time

    record = json.loads((audit_dir / "audit.json").read_text())
    label = next(f for f in record["findings"] if f["kind"] == "label")
    record["findings"] += [{**label, "rank": r, "score": r / 1e5} for r in range(2, 10_002)]
    (audit_dir / "audit.json").write_text(json.dumps(record))
    with running(audit_dir) as server:
        started = time.perf_counter()
        status, page, _ = call(server, "GET", "/api/items?section=label&offset=9950&limit=50")
        took = time.perf_counter() - started
        assert status == 200 and page["total"] >= 10_000 and len(page["items"]) == 50
        assert took < 2.0, f"a page of 50 out of 10k items took {took:.2f} s"
