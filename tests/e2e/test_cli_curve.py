"""CURVE through the CLI: ``fedctl keygen``, a keyed ``serve`` + ``join`` run over loopback TCP, and the default
policy that refuses a reachable plaintext bind unless ``--insecure`` says so."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, Launcher, fedctl, read_metrics

pytestmark = pytest.mark.timeout(240)
CONFIG = 2
PUBLIC_KEY = re.compile(r"public key: (\S{40})$", re.M)
BROKER_KEY = re.compile(r"broker public key (\S{40}) ")


def error_line(stderr: str) -> str:
    """The one ``error: cause — fix`` line, last on stderr, with no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and " — " in lines[-1], stderr
    return lines[-1]


def keygen(tmp: Path, out: Path, name: str, *extra: str) -> str:
    """Run ``fedctl keygen``; returns the public key it printed."""
    run = fedctl(tmp, "keygen", "--out", str(out), "--name", name, *extra)
    assert run.returncode == 0, run.stderr
    found = PUBLIC_KEY.search(run.stdout)
    assert found, run.stdout
    return found.group(1)


def test_keygen_writes_a_private_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    key = keygen(tmp_path, out, "w0")
    public, secret = out / "w0.key", out / "w0.key_secret"
    assert key in public.read_text() and key in secret.read_text() and "secret-key" in secret.read_text()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["w0.key", "w0.key_secret"]  # no staging leftovers

    again = fedctl(tmp_path, "keygen", "--out", str(out), "--name", "w0")
    assert again.returncode == CONFIG
    line = error_line(again.stderr)
    assert "w0.key" in line and "--force" in line, line
    assert key in public.read_text()  # untouched

    assert keygen(tmp_path, out, "w0", "--force") != key


def test_curve_serve_and_join_finish_a_run(spawn: Launcher, partition_dir: Path, tmp_path: Path) -> None:
    broker_key = keygen(tmp_path, tmp_path / "broker-keys", "broker")
    keygen(tmp_path, tmp_path / "worker-keys", "w0")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "worker-keys" / "w0.key", allowed)
    state = tmp_path / "state"
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state), "--rounds", "2",
                   "--min-workers", "1", "--secret-key", str(tmp_path / "broker-keys" / "broker.key_secret"),
                   "--allowed-keys", str(allowed))
    endpoint = broker.wait_endpoint()
    logged = BROKER_KEY.search(broker.stderr)
    assert logged and logged.group(1) == broker_key, broker.describe()  # operators can read it off the log
    worker = spawn("join", "join", "--connect", endpoint, "--data", "shard0", "--data-dir", str(partition_dir),
                   "--backend", "torch", "--threads", "1", "--connect-timeout", "60",
                   "--server-key", broker_key, "--secret-key", str(tmp_path / "worker-keys" / "w0.key_secret"))
    assert worker.wait(150) == 0, worker.describe()
    assert broker.wait(60) == 0, broker.describe()
    assert [m["round"] for m in read_metrics(state)] == [1, 2]
    assert "run complete: 2 rounds" in broker.stdout
    assert "done: trained 2 rounds; run finished at round 2" in worker.stdout, worker.describe()


def test_status_key_mistakes_are_one_line_each(spawn: Launcher, tmp_path: Path) -> None:
    """``fedctl status`` against a CURVE broker: the right admitted pair gets the run; no keys, a key the broker does
    not admit and a wrong broker key each get their own cause and fix in one line (exit 7), before the timeout."""
    broker_key = keygen(tmp_path, tmp_path / "broker-keys", "broker")
    keygen(tmp_path, tmp_path / "keys", "ops")
    intruder_key = keygen(tmp_path, tmp_path / "keys", "intruder")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "keys" / "ops.key", allowed)
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "state"), "--rounds", "2",
                   "--min-workers", "1", "--secret-key", str(tmp_path / "broker-keys" / "broker.key_secret"),
                   "--allowed-keys", str(allowed))
    endpoint = broker.wait_endpoint()
    keys = tmp_path / "keys"
    ok = fedctl(tmp_path, "status", "--connect", endpoint, "--json", "--server-key", broker_key,
                "--secret-key", str(keys / "ops.key_secret"), timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["rounds"] == 2, ok.stderr
    for options, cause in [((), "the broker uses CURVE keys"),
                           (("--server-key", broker_key, "--secret-key", str(keys / "intruder.key_secret")),
                            "refused this client's CURVE key"),
                           (("--server-key", intruder_key, "--secret-key", str(keys / "ops.key_secret")),
                            "--server-key is not its public key")]:
        run = fedctl(tmp_path, "status", "--connect", endpoint, "--timeout", "30", *options, timeout=60)
        assert run.returncode == 7 and "Traceback" not in run.stderr, run.stderr
        assert error_line(run.stderr).startswith("error: ") and cause in run.stderr and " — " in run.stderr
        assert "no answer" not in run.stderr  # the handshake's failure, not the 30 s timeout


def test_reachable_bind_needs_keys_or_insecure(spawn: Launcher, tmp_path: Path) -> None:
    run = fedctl(tmp_path, "serve", "--bind", "tcp://*:*", "--state-dir", str(tmp_path / "s1"))
    assert run.returncode == CONFIG
    line = error_line(run.stderr)
    assert "tcp://*:*" in line and "fedctl keygen" in line, line
    assert "--secret-key" in line and "--allowed-keys" in line and "--insecure" in line, line

    broker = spawn("serve", "serve", "--bind", "tcp://*:*", "--insecure", "--state-dir", str(tmp_path / "s2"))
    endpoint = broker.wait_endpoint()
    assert endpoint.startswith("tcp://0.0.0.0:"), endpoint
    assert "in plaintext (--insecure)" in broker.stderr, broker.describe()  # logged before the endpoint
    assert broker.popen.poll() is None, broker.describe()


@pytest.mark.parametrize("args, words", [
    (("--server-key", "not-a-key", "--secret-key", "KEYS/w0.key_secret"), ["not-a-key", "40-character Z85"]),
    (("--server-key", "BROKER", "--secret-key", "KEYS/missing.key_secret"), ["missing.key_secret", "fedctl keygen"]),
    (("--server-key", "BROKER", "--secret-key", "KEYS/w0.key"), ["only a public key", "w0.key_secret"]),
    (("--server-key", "BROKER"), ["--secret-key is missing"]),
])
def test_join_key_mistakes(tmp_path: Path, partition_dir: Path, args: tuple[str, ...], words: list[str]) -> None:
    keys = tmp_path / "keys"
    broker_key = keygen(tmp_path, keys, "w0")  # any public key will do as the broker's here
    filled = [a.replace("KEYS", str(keys)).replace("BROKER", broker_key) for a in args]
    run = fedctl(tmp_path, "join", "--data", "shard0", "--data-dir", str(partition_dir), "--backend", "torch",
                 *filled)
    assert run.returncode == CONFIG
    line = error_line(run.stderr)
    assert all(word in line for word in words), line


def test_serve_without_worker_keys(tmp_path: Path) -> None:
    keygen(tmp_path, tmp_path / "keys", "broker")
    empty = tmp_path / "allowed"
    empty.mkdir()
    run = fedctl(tmp_path, "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(tmp_path / "s"), "--secret-key",
                 str(tmp_path / "keys" / "broker.key_secret"), "--allowed-keys", str(empty))
    assert run.returncode == CONFIG
    line = error_line(run.stderr)
    assert str(empty) in line and "NAME.key" in line, line
