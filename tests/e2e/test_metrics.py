"""``fedctl serve --metrics-bind``: Prometheus's ``/metrics`` of a running broker, scraped over real HTTP while real
``fedctl join`` processes train, parsed with ``prometheus_client.parser``, and checked against ``metrics.jsonl``;
the bearer token of a non-loopback listener."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import LOOPBACK_ANY, Launcher, Proc, fedctl, read_metrics
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str, token: str | None = None) -> dict[str, list[Any]]:
    """``/metrics`` parsed: metric family name → its samples."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    """The sample ``name`` (a counter's without its ``_total``; a histogram's ``_count`` or ``_sum``)."""
    for samples in families.values():
        for sample in samples:
            if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def join(spawn: Launcher, endpoint: str, data_dir: Path, shard: int, *options: str) -> Proc:
    return spawn(f"join-{shard}", "join", "--connect", endpoint, "--data", f"shard{shard}", "--data-dir",
                 str(data_dir), "--backend", "torch", "--threads", "1", "--connect-timeout", "60", "--slowdown", "4",
                 *options)


def test_a_scrape_agrees_with_metrics_jsonl(spawn: Launcher, partition_dir: Path, tmp_path: Path) -> None:
    state, port = tmp_path / "state", free_port()
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state), "--rounds", "5",
                   "--min-workers", "2", "--eval-data", "test", "--data-dir", str(partition_dir),
                   "--metrics-bind", f"127.0.0.1:{port}", "--metrics-per-worker")
    endpoint = broker.wait_endpoint()
    assert f"metrics on http://127.0.0.1:{port}/metrics" in broker.stderr
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)
    assert value(before, "fedctl_workers_connected") == 0 and value(before, "fedctl_model_version") == 0
    assert "fedctl_test_accuracy" not in before, "no evaluation yet: absent, not 0"
    worker_port = free_port()
    workers = [join(spawn, endpoint, partition_dir, 0, "--metrics-bind", f"127.0.0.1:{worker_port}"),
               join(spawn, endpoint, partition_dir, 1)]
    checked = 0
    deadline = time.monotonic() + 150
    while checked < 2 and time.monotonic() < deadline:  # two mid-run scrapes, each matched with its round's line
        time.sleep(0.2)
        try:
            families = scrape(url)
        except urllib.error.URLError:
            break  # the run ended and the listener with it
        records = {r["round"]: r for r in read_metrics(state)}
        done = value(families, "fedctl_round")
        if not done or int(done) not in records or int(done) == 5 or len(records) != int(done):
            continue
        record = records[int(done)]
        # (the next round may be aggregated, its model installed, while its line is not yet written)
        assert value(families, "fedctl_model_version") in (record["version"], record["version"] + 1)
        assert value(families, "fedctl_test_accuracy") == pytest.approx(record["test_accuracy"], abs=1e-12)
        assert value(families, "fedctl_test_loss") == pytest.approx(record["test_loss"], abs=1e-12)
        assert value(families, "fedctl_workers_connected") == 2 and value(families, "fedctl_workers_stale") == 0
        assert value(families, "fedctl_round_duration_seconds_count") == len(records)
        assert value(families, "fedctl_round_duration_seconds_sum") == pytest.approx(
            sum(r["duration_s"] for r in records.values()), abs=1e-6)
        applied = sum(r["participants"] for r in records.values())
        assert value(families, "fedctl_applied_updates") in (applied, applied + 2)
        # every accepted update's latency, and (--metrics-per-worker) each worker's own count of them
        accepted = value(families, "fedctl_push_latency_seconds_count")
        assert accepted is not None and applied <= accepted <= applied + 2
        per_worker = [value(families, "fedctl_peer_updates", worker=f"shard{i}@{socket.gethostname()}")
                      for i in (0, 1)]
        assert None not in per_worker and sum(per_worker) == accepted, per_worker
        pushed = value(families, "fedctl_received_message_bytes", type="push")
        assert pushed is not None and pushed >= sum(r["update_bytes_in"] for r in records.values())
        assert value(families, "fedctl_received_bytes") >= sum(r["bytes_in"] for r in records.values())
        assert not families["fedctl_refused_messages"] and record["rejected_total"] == 0
        checked += 1
        if checked > 1:
            continue
        # `fedctl status` (ZeroMQ, §7.5) tells the same run: asked right after the first scrape (round 1 or 2 of 5)
        asked = fedctl(tmp_path, "status", "--connect", endpoint, "--json", timeout=30)
        assert asked.returncode == 0, asked.stderr
        told = json.loads(asked.stdout)
        if told["round"] == int(done):
            assert told["version"] == record["version"] and told["workers_connected"] == 2
            if told["last_round"].get("round") == int(done):  # (committed: its line and its last_round agree)
                assert told["last_round"]["test_accuracy"] == record["test_accuracy"]
            assert told["applied_updates"] == value(families, "fedctl_applied_updates")
            assert told["workers_total"] == len(told["workers"]) == 2
        # the worker's own /metrics (fedctl join --metrics-bind): its rounds, its last training, its traffic
        own = scrape(f"http://127.0.0.1:{worker_port}/metrics")
        trained = value(own, "fedctl_worker_rounds_trained")
        assert trained is not None and 1 <= trained <= 5 and value(own, "fedctl_worker_connected") == 1
        assert value(own, "fedctl_worker_train_seconds") > 0 and value(own, "fedctl_worker_samples_per_second") > 0
        assert value(own, "fedctl_worker_sent_bytes") >= trained * record["update_bytes_in"] / 2 * 0.9
        assert "fedctl_worker_residual_norm" not in own, "FedAvg keeps no private strategy state"
        assert value(own, "fedctl_worker_model_version") >= record["version"] - 1  # (the run goes on meanwhile)
        table = fedctl(tmp_path, "status", "--connect", endpoint, timeout=30)
        assert table.returncode == 0 and "workers (2 of 2" in table.stdout and "fedavg" in table.stdout, table
        assert f"shard0@{socket.gethostname()}" in table.stdout, table.stdout  # whole, at 80 columns
    assert checked == 2, "no scrape landed between two rounds"
    codes = {p.name: p.wait(150) for p in [broker, *workers]}
    assert all(c == 0 for c in codes.values()), "\n\n".join(p.describe() for p in [broker, *workers])

    # `fedctl report` of the finished run: one page that needs nothing else, and its PNG
    made = fedctl(tmp_path, "report", str(state), "--out", str(tmp_path / "out" / "run.html"), timeout=120)
    assert made.returncode == 0, made.stderr
    page = (tmp_path / "out" / "run.html").read_text()
    final = read_metrics(state)[-1]
    assert f"{final['test_accuracy']:.4f}" in page and "5 rounds recorded" in page and "2 workers took part" in page
    assert page.count("<tr>") >= 5 + 2 + 5, "a row per round, per worker and per ledger line"
    assert "data:image/png;base64," in page and not re.search(r'(src|href)="(https?:)?//', page), "self-contained"
    assert (tmp_path / "out" / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_token_guards_a_reachable_listener(spawn: Launcher, tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text("s3cret-token-of-enough-length\n")
    port = free_port()
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "state"),
                   "--metrics-bind", f"0.0.0.0:{port}", "--metrics-token", str(token_file))
    broker.wait_endpoint()
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(url)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        scrape(url, "s3cret-token-of-enough-lengtX")
    assert wrong.value.code == 401
    assert value(scrape(url, "s3cret-token-of-enough-length"), "fedctl_workers_connected") == 0
    with pytest.raises(urllib.error.HTTPError) as nothing:  # read-only: no other route, no other method
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST", headers={
            "Authorization": "Bearer s3cret-token-of-enough-length"}), timeout=5)
    assert nothing.value.code == 405
    site = f"http://127.0.0.1:{port}"
    for path in ("/", "/api/status", "/api/stream", "/static/dashboard.js"):  # the dashboard is guarded as well
        with pytest.raises(urllib.error.HTTPError) as guarded:
            urllib.request.urlopen(site + path, timeout=5)
        assert guarded.value.code == 401, path
    # a browser's way in: /?token= once sets an HttpOnly cookie and redirects to the bare page
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(f"{site}/?token=s3cret-token-of-enough-length", timeout=5) as page:
        assert page.status == 200 and page.url == site + "/" and b'id="workers"' in page.read()
    with opener.open(site + "/api/status", timeout=5) as reply:
        assert json.loads(reply.read())["workers_connected"] == 0
    with pytest.raises(urllib.error.HTTPError) as wrong_cookie:
        urllib.request.urlopen(urllib.request.Request(site + "/api/status", headers={
            "Cookie": "fedctl_token=s3cret-token-of-enough-lengtX"}), timeout=5)
    assert wrong_cookie.value.code == 401
    broker.popen.terminate()
    broker.wait(30)
    assert "refused an HTTP request for '/metrics'" in broker.stderr and "s3cret" not in broker.stderr


@pytest.mark.parametrize("options, cause", [
    (["--metrics-bind", "0.0.0.0:{port}"], "is reachable from other machines and has no token"),
    (["--metrics-bind", "localhost"], "is not HOST:PORT"),
    (["--metrics-bind", "127.0.0.1:{port}", "--metrics-token", "{tmp}/missing"], "cannot be read"),
    (["--metrics-bind", "127.0.0.1:{port}", "--metrics-token", "{tmp}/short"], "at least 16 characters"),
    (["--metrics-bind", "127.0.0.1:{busy}"], "cannot be bound"),
    (["--metrics-per-worker"], "there is none"),
])
def test_metrics_mistakes_are_one_line_refusals(tmp_path: Path, options: list[str], cause: str) -> None:
    (tmp_path / "short").write_text("tiny\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [o.format(port=free_port(), tmp=tmp_path, busy=busy.getsockname()[1]) for o in options]
        run = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "state"), *args,
                     timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and cause in lines[0] and " — " in lines[0], lines
    assert not (tmp_path / "state").exists(), "nothing half-written"


def test_status_of_a_broker_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "status", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5", timeout=30)
    assert run.returncode == 7 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("error: no answer from tcp://127.0.0.1:") and " — start `fedctl serve` there" in line


def test_report_of_a_directory_without_a_run_is_one_line(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "report", str(tmp_path / "nothing"), timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert "holds no checkpoint" in line and " — " in line
    assert not (tmp_path / "nothing").exists()


def test_malformed_and_stalled_http_clients_do_not_disturb_the_broker(spawn: Launcher, tmp_path: Path) -> None:
    """A request that is not HTTP gets 400; a client that sends half a request and stalls holds one connection
    and nothing else: scrapes and `fedctl status` still answer, and the broker logs no traceback."""
    port = free_port()
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "state"),
                   "--metrics-bind", f"127.0.0.1:{port}")
    endpoint = broker.wait_endpoint()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as garbage:
        garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert b" 400 Bad Request" in garbage.recv(64)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for s in stalled:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        started = time.monotonic()
        assert value(scrape(f"http://127.0.0.1:{port}/metrics"), "fedctl_workers_connected") == 0
        asked = fedctl(tmp_path, "status", "--connect", endpoint, "--json", timeout=30)
        assert asked.returncode == 0 and json.loads(asked.stdout)["workers_connected"] == 0
        assert time.monotonic() - started < 20
    finally:
        for s in stalled:
            s.close()
    # dashboards that open the event stream and never read: the broker serves up to 32, refuses the next with
    # 503, and scrapes still answer; the static route serves its own files only
    viewers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
    try:
        for v in viewers:
            v.sendall(b"GET /api/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        for v in viewers:
            assert v.recv(15) == b"HTTP/1.1 200 OK"
        with pytest.raises(urllib.error.HTTPError) as crowded:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stream", timeout=5)
        assert crowded.value.code == 503
        time.sleep(2)  # (two ticks of updates that nobody reads)
        assert value(scrape(f"http://127.0.0.1:{port}/metrics"), "fedctl_workers_connected") == 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sneaky:
            sneaky.sendall(b"GET /static/../../setup.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sneaky.recv(64).startswith(b"HTTP/1.1 404")
    finally:
        for v in viewers:
            v.close()
    assert broker.popen.poll() is None, broker.describe()
    broker.popen.terminate()
    broker.wait(30)
    assert "Traceback" not in broker.stderr, broker.stderr
