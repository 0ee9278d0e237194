"""A new user's mistakes, one real ``fedctl`` subprocess each: one line naming the cause and the fix, nothing written.

Every case asserts: a non-zero exit code (the expected one), no traceback, exactly one non-empty line of output in
all (``error: CAUSE — FIX``), the words that show the line names this cause and an option the command really has,
and a working directory left exactly as it was (no run directory, no partial file, no write probe). Every case
fails before a deep-learning framework is imported, so each takes well under a second or two.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pytest
import zmq
from conftest import fedctl_env

from fedctl.cli.main import cli, main
from fedctl.errors import ConfigError
from fedctl.security import generate_key_pair

pytestmark = pytest.mark.timeout(120)

USAGE = CONFIG = 2  # click's usage errors and fedctl's ConfigError
DATA, BACKEND, TRANSPORT = 3, 4, 7
LOOPBACK = "tcp://127.0.0.1:*"


@dataclass(frozen=True)
class Mistake:
    """``fedctl ARGS`` (``{name}`` placeholders filled from the fixtures), the exit code and words of the line."""

    name: str
    args: tuple[str, ...]
    code: int
    needles: tuple[str, ...]
    absent: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def m(name: str, args: str, code: int, *needles: str, absent: tuple[str, ...] = (),
      env: dict[str, str] | None = None) -> Mistake:
    return Mistake(name, tuple(args.split()), code, needles, absent, env or {})


SERVE = f"serve --bind {LOOPBACK} --state-dir {{tmp}}/state"
NO_SOURCE_OPTIONS = ("--source-dir", "add --download")  # join and serve have neither option

MISTAKES = [
    # Output directories that cannot be written: refused before any work, nothing created.
    m("partition-out-unwritable", "partition --dataset mnist-sample --iid --clients 2 --out {file}/out", CONFIG,
      "--out {file}/out", "not a directory", "pass --out a directory you can write to"),
    m("serve-state-dir-unwritable", f"serve --bind {LOOPBACK} --state-dir {{file}}/state", CONFIG,
      "--state-dir {file}/state", "not a directory"),
    m("simulate-state-dir-unwritable", "simulate --data-dir {part} --rounds 1 --state-dir {file}/state", CONFIG,
      "--state-dir {file}/state", "not a directory"),
    m("demo-out-unwritable", "demo --workers 2 --rounds 1 --out {file}/demo", CONFIG, "--out {file}/demo"),
    m("join-state-dir-unwritable", "join --data shard0 --data-dir {part} --state-dir {file}/w", CONFIG,
      "--state-dir {file}/w"),
    m("bench-out-unwritable", "bench heartbeat --workers 2 --duration 1 --out {file}/bench", CONFIG,
      "--out {file}/bench"),
    m("keygen-out-unwritable", "keygen --out {file}/keys --name w", CONFIG, "{file}/keys", "--out"),
    # click's usage errors: one line, not four.
    m("unknown-option", "serve --bogus", USAGE, "no such option", "--bogus", "`fedctl serve --help`"),
    m("missing-option", "join", USAGE, "missing option '--data'", "`fedctl join --help`"),
    m("extra-argument", "serve extra", USAGE, "unexpected extra argument (extra)"),
    m("unknown-command", "bogus", USAGE, "no such command 'bogus'", "`fedctl --help`"),
    m("misspelt-command", "servee", USAGE, "no such command 'servee'", "Did you mean 'serve'?"),
    m("unknown-model", "serve --model resnet", USAGE, "--model", "'resnet' is not one of", "mlp"),
    m("secret-key-is-a-directory", "join --data shard0 --data-dir {part} --server-key k --secret-key {part}",
      USAGE, "--secret-key", "is a directory"),
    m("bad-value-from-env", "serve", USAGE, "--rounds", "$FEDCTL_SERVE_ROUNDS", "unset FEDCTL_SERVE_ROUNDS",
      env={"FEDCTL_SERVE_ROUNDS": "abc"}),
    # Numbers out of range.
    m("worker-id-too-long", "join --data shard0 --data-dir {part} --worker-id " + "w" * 129, CONFIG,
      "(--worker-id) is longer than the 128 characters", "pass a shorter --worker-id"),
    m("connect-timeout-negative", "join --data shard0 --data-dir {part} --connect-timeout -1", USAGE,
      "--connect-timeout", "-1.0 is not in the range x>0"),
    m("rounds-zero", f"{SERVE} --rounds 0", USAGE, "--rounds", "0 is not in the range x>=1"),
    m("compress-unknown", f"{SERVE} --compress fast", USAGE, "--compress", "'fast' is not one of", "auto"),
    m("join-compress-unknown", "join --data shard0 --data-dir {part} --compress yes", USAGE, "--compress",
      "'yes' is not one of"),
    m("bench-round-unknown-model", "bench round --model resnet --no-flower --out {tmp}/bench", USAGE, "--model",
      "unknown model 'resnet'", "wide5m"),
    m("bench-round-too-few-rounds", "bench round --rounds 2 --no-flower --out {tmp}/bench", USAGE, "--rounds",
      "2 is not in the range x>=3"),
    m("bench-round-no-workers", "bench round --workers 0 --no-flower --out {tmp}/bench", CONFIG, "--workers",
      "e.g. --workers 10,50,100"),
    m("bench-round-out-unwritable", "bench round --workers 2 --no-flower --out {file}/bench", CONFIG,
      "--out {file}/bench"),
    m("fraction-two", f"{SERVE} --fraction 2", USAGE, "--fraction", "2.0 is not in the range 0<x<=1"),
    m("seed-negative", "partition --dataset mnist-sample --iid --seed -1 --out {tmp}/out", USAGE, "--seed"),
    m("lr-zero", "demo --lr 0 --out {tmp}/demo", USAGE, "--lr", "x>0"),
    m("round-timeout-negative", f"{SERVE} --round-timeout -5", USAGE, "--round-timeout"),
    m("chunk-above-half-message", f"{SERVE} --max-message-mb 0.1", CONFIG, "--chunk-kb 256",
      "--max-message-mb 0.1", "pass --chunk-kb 51 or less"),
    m("sampled-above-workers", "bench scale --workers 10 --sampled 20 --out {tmp}/bench", CONFIG,
      "--sampled 20", "--workers 10"),
    # Endpoints.
    m("bind-without-scheme", "serve --bind 127.0.0.1:47014 --state-dir {tmp}/state", CONFIG,
      "--bind '127.0.0.1:47014' lacks a transport", "pass tcp://127.0.0.1:47014", absent=("other machines",)),
    m("bind-port-only", "serve --bind 47014 --state-dir {tmp}/state", CONFIG, "pass tcp://127.0.0.1:47014"),
    m("bind-http", "serve --bind http://127.0.0.1:47014 --state-dir {tmp}/state", CONFIG,
      "http:// is not a ZeroMQ transport", "tcp://127.0.0.1:47014"),
    m("connect-without-scheme", "join --connect 127.0.0.1:5555 --data shard0 --data-dir {part}", CONFIG,
      "--connect '127.0.0.1:5555'", "pass tcp://127.0.0.1:5555"),
    m("connect-to-every-interface", "join --connect tcp://*:5555 --data shard0 --data-dir {part}", CONFIG,
      "is for binding, not connecting", "tcp://127.0.0.1:5555"),
    m("bind-in-use", "serve --bind {busy} --state-dir {tmp}/state", TRANSPORT, "already in use", "--bind"),
    # Run options and strategy options, all checked before the broker binds or writes.
    m("bad-policy", f"{SERVE} --policy bogus", CONFIG, "--policy 'bogus'", "ssp:S"),
    m("opt-not-key-value", f"{SERVE} --opt garbage", CONFIG, "--opt 'garbage' is not KEY=VALUE"),
    m("opt-unknown-key", f"{SERVE} --opt foo=1", CONFIG, "no option 'foo'", "fedctl strategies"),
    m("opt-bad-value", f"{SERVE} --strategy dgc --opt sparsity=abc", CONFIG, "sparsity='abc'"),
    m("eval-backend-unknown", f"{SERVE} --eval-backend caffe", USAGE, "--eval-backend", "'caffe'"),
    m("demo-strategy-unknown", "demo --strategy bogus --out {tmp}/demo", USAGE, "--strategy", "'bogus'"),
    m("demo-backend-unknown", "demo --backends caffe --out {tmp}/demo", CONFIG, "--backends", "'caffe'", "torch"),
    m("partition-both-schemes", "partition --dataset mnist-sample --iid --shards-per-client 2 --out {tmp}/out",
      CONFIG, "both --iid and --shards-per-client", "exactly one of --iid and --shards-per-client"),
    m("partition-no-scheme", "partition --dataset mnist-sample --out {tmp}/out", CONFIG,
      "exactly one of --iid and --shards-per-client"),
    m("bench-fl-no-preset", "bench fl --out {tmp}/bench", CONFIG, "no --preset given", "--preset"),
    m("bench-comm-central-preset", "bench comm --preset central-mlp --no-topk --out {tmp}/bench", CONFIG,
      "--preset central-mlp is a centralised baseline", "fedctl bench fl"),
    m("simulate-too-many-clients", "simulate --dataset mnist-sample --clients 20000 --state-dir {tmp}/state", CONFIG,
      "cannot cut 10000 examples into 20000"),
    m("simulate-dirichlet-and-shards", "simulate --dataset mnist-sample --dirichlet 0.5 --shards-per-client 2 "
      "--state-dir {tmp}/state", CONFIG, "both --shards-per-client 2 and --dirichlet 0.5", "pass one of them"),
    m("simulate-more-workers-than-shards", "simulate --data-dir {part} --workers 99 --state-dir {tmp}/state",
      CONFIG, "--workers 99", "5 shards", "pass --workers 5 or fewer"),
    # Data: the fix names options the failing command has.
    m("join-dataset-missing", "join --data mnist:test", DATA, "dataset 'mnist' not found",
      "fedctl partition --dataset mnist --download", absent=NO_SOURCE_OPTIONS),
    # Privacy: secure aggregation and DP-FedAvg settings that make no sense are refused before anything runs.
    m("secagg-with-dgc", f"{SERVE} --secure-aggregation --strategy dgc", CONFIG, "--strategy dgc sends sparse",
      "use --strategy fedavg or fedsgd"),
    m("secagg-with-async", f"{SERVE} --secure-aggregation --policy async", CONFIG, "needs rounds (--policy sync)",
      "drop --policy"),
    m("secagg-clip-zero", f"{SERVE} --secure-aggregation --secagg-clip 0", USAGE, "--secagg-clip"),
    m("dp-noise-zero", f"{SERVE} --dp-noise-multiplier 0", USAGE, "--dp-noise-multiplier",
      "0.0 is not in the range x>0"),
    m("dp-clip-negative", f"{SERVE} --dp-noise-multiplier 1 --dp-clip -1", USAGE, "--dp-clip",
      "-1.0 is not in the range x>0"),
    m("dp-target-without-dp", f"{SERVE} --dp-target-epsilon 3", CONFIG, "need differential privacy on",
      "--dp-noise-multiplier Z"),
    m("dp-with-ssgd", f"{SERVE} --dp-noise-multiplier 1 --strategy ssgd", CONFIG, "--strategy ssgd is not one"),
    m("dp-adaptive-with-secagg", f"{SERVE} --dp-noise-multiplier 1 --dp-adaptive-quantile 0.5 --secure-aggregation",
      CONFIG, "--dp-adaptive-quantile with --secure-aggregation is not available", "use a fixed --dp-clip"),
    m("dp-adaptive-too-few-workers", f"{SERVE} --dp-noise-multiplier 1 --dp-adaptive-quantile 0.5", CONFIG,
      "a round may sample 1", "raise --min-workers above 10"),
    m("serve-eval-dataset-missing", f"{SERVE} --eval-data mnist:test", DATA, "dataset 'mnist' not found",
      absent=NO_SOURCE_OPTIONS),
    m("simulate-dataset-missing", "simulate --dataset mnist --state-dir {tmp}/state", DATA, "--source-dir DIR",
      absent=("add --download",)),
    m("partition-dataset-missing", "partition --dataset mnist --iid --out {tmp}/out", DATA, "--source-dir DIR",
      "add --download"),
    m("join-shard-path-as-data", "join --data {tmp}/nowhere/shard0.npz", CONFIG,
      "--data-dir {tmp}/nowhere --data shard0"),
    m("join-shard-without-data-dir", "join --data shard0", CONFIG, "no --data-dir was given", "--data-dir DIR"),
    m("serve-eval-shard-without-data-dir", f"{SERVE} --eval-data test", CONFIG, "--eval-data 'test'",
      "--data-dir DIR"),
    m("join-data-dir-missing", "join --data shard0 --data-dir {tmp}/nowhere", DATA, "does not exist",
      "fedctl partition"),
    m("shard-not-npz", "join --data shard0 --data-dir {damaged}", DATA, "is not a .npz archive",
      "fedctl partition", absent=("pickle",)),
    m("shard-wrong-arrays", "join --data shard1 --data-dir {damaged}", DATA,
      "holds the arrays a, b, not a shard's x and y", absent=("pickle", "is not a file in the archive")),
    # Keys.
    m("allowed-keys-garbage", f"{SERVE} --secret-key {{keys}}/broker.key_secret --allowed-keys {{badkeys}}",
      CONFIG, "--allowed-keys", "cannot read a key"),
    m("secret-key-is-public", f"{SERVE} --secret-key {{keys}}/broker.key --allowed-keys {{keys}}", CONFIG,
      "holds only a public key", "broker.key_secret"),
    # State dirs of earlier runs.
    m("resume-damaged-checkpoint", f"serve --bind {LOOPBACK} --state-dir {{damaged_run}}", CONFIG,
      "model-3.npz is not a .npz archive", "pass a fresh --state-dir", absent=("pickle",)),
    m("simulate-resume-another-model", "simulate --data-dir {part} --rounds 1 --state-dir {other_run}", CONFIG,
      "holds a run of model 'lenet5'", "--model and --strategy"),
    # A data holder's own dataset ({bad}: see the bad_inputs fixture) and the partition schemes.
    m("partition-input-no-label-column", "partition --input {bad}/no-label.csv --iid --clients 2 --out {tmp}/out",
      DATA, "has no label column 'label' (its columns: age, weight, target)", "--label-column NAME"),
    m("partition-input-empty", "partition --input {bad}/empty.csv --iid --clients 2 --out {tmp}/out", DATA,
      "{bad}/empty.csv holds no examples"),
    m("partition-input-not-numeric", "partition --input {bad}/words.csv --iid --clients 2 --out {tmp}/out", DATA,
      "feature columns are not numeric: city ('Paris' in row 1)"),
    m("partition-input-unreadable-images", "partition --input {bad}/images --iid --clients 2 --out {tmp}/out", DATA,
      "none of the 2 image files under {bad}/images could be read", "PNG or JPEG"),
    m("partition-input-unknown-format", "partition --input {bad}/data.xlsx --iid --clients 2 --out {tmp}/out", DATA,
      "unknown dataset format '.xlsx'", "CSV or Parquet"),
    m("partition-input-missing", "partition --input {tmp}/nowhere.csv --iid --clients 2 --out {tmp}/out", DATA,
      "{tmp}/nowhere.csv does not exist"),
    m("partition-input-with-source-dir", "partition --input {bad}/empty.csv --source-dir {tmp} --iid --out {tmp}/out",
      CONFIG, "--source-dir, which is for a registered dataset", "drop --source-dir"),
    m("partition-test-fraction-without-input", "partition --dataset mnist-sample --iid --test-fraction 0.2 "
      "--out {tmp}/out", CONFIG, "--test-fraction only applies to --input", "--input PATH"),
    m("partition-dirichlet-zero", "partition --dataset mnist-sample --dirichlet 0 --out {tmp}/out", USAGE,
      "--dirichlet", "0.0 is not in the range x>0"),
    m("partition-dirichlet-not-a-number", "partition --dataset mnist-sample --dirichlet half --out {tmp}/out", USAGE,
      "--dirichlet", "'half' is not a valid float"),
    m("partition-two-skews", "partition --dataset mnist-sample --dirichlet 0.5 --quantity-skew 0.5 --out {tmp}/out",
      CONFIG, "both --dirichlet and --quantity-skew were given", "--quantity-skew BETA"),
    m("partition-image-size-bad", "partition --input {bad}/images --image-size 32 --iid --out {tmp}/out", USAGE,
      "--image-size", "'32' is not HEIGHTxWIDTH"),
    m("join-input-no-label-column", "join --data {bad}/no-label.csv", DATA, "has no label column 'label'",
      "rename the label column to 'label'", "--label-column NAME"),
    m("join-input-wrong-label-column", "join --data {bad}/no-label.csv --label-column outcome", DATA,
      "has no label column 'outcome' (its columns: age, weight, target)", "pass --label-column one of its columns"),
    m("join-label-not-in-classes", "join --data {bad}/no-label.csv --label-column target --classes 1,2", DATA,
      "label '0' is not in the class list (1, 2)", "add it to --classes"),
    m("join-classes-twice", "join --data {bad}/no-label.csv --label-column target --classes 0,1,0", DATA,
      "the class list names '0' twice"),
    m("join-classes-empty-name", "join --data {bad}/no-label.csv --classes a,,b", USAGE, "--classes",
      "an empty class name"),
    m("join-classes-for-a-shard", "join --data shard0 --data-dir {part} --classes 0,1", CONFIG,
      "--classes applies to a dataset file or folder (--data PATH), not to --data 'shard0'", "drop --classes"),
    m("join-input-empty", "join --data {bad}/empty.csv", DATA, "holds no examples"),
    m("join-input-missing", "join --data {tmp}/nowhere.csv", CONFIG, "no such file or folder",
      "pass the path of an existing dataset"),
    m("join-holdout-one", "join --data shard0 --data-dir {part} --holdout 1", USAGE, "--holdout",
      "1.0 is not in the range 0<=x<1"),
    # Getting the model out: every refusal comes before the model is read, so no output file is started.
    m("export-no-checkpoint", "export --state-dir {tmp}/nowhere --format npz", CONFIG,
      "{tmp}/nowhere holds no checkpoint", "pass the --state-dir of a run"),
    m("export-round-not-kept", "export --state-dir {damaged_run} --round 1 --format npz", CONFIG,
      "round 1 is not kept", "round(s) 3", "--keep-models"),
    m("export-no-best-model", "export --state-dir {damaged_run} --best --format npz", CONFIG,
      "holds no best model", "--best-metric", "without --best"),
    m("export-round-and-best", "export --state-dir {damaged_run} --round 3 --best", CONFIG,
      "both --round 3 and --best", "pass one of them"),
    m("export-unknown-format", "export --state-dir {damaged_run} --format onnx", USAGE, "--format", "'onnx'"),
    m("export-out-suffix-of-another-format", "export --state-dir {damaged_run} --format pt --out {tmp}/m.npz",
      CONFIG, "--out {tmp}/m.npz has the suffix of --format npz", "--format npz"),
    m("export-out-unwritable", "export --state-dir {damaged_run} --format npz --out {file}/m.npz", CONFIG,
      "--out {file}/m.npz cannot be written", "not a directory"),
    m("export-damaged-model", "export --state-dir {damaged_run} --format npz --out {tmp}/m.npz", CONFIG,
      "model-3.npz is not a .npz archive", absent=("pickle",)),
    m("export-another-task", "export --state-dir {damaged_run} --task lenet5 --format npz --out {tmp}/m.npz", CONFIG,
      "holds a run of model 'mlp', not of task 'lenet5'", "the --task (or --model) the run was started with"),
]


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A state dir whose model file is damaged, and one holding a run of another model."""
    damaged, other = tmp_path_factory.mktemp("damaged-run"), tmp_path_factory.mktemp("other-run")
    state = {"run_id": "0123", "model": "mlp", "strategy": "fedavg", "round": 3, "version": 3,
             "model_file": "model-3.npz", "seed": 0, "strategy_state": {}}
    (damaged / "state.json").write_text(json.dumps(state))
    (damaged / "model-3.npz").write_bytes(b"cut short")
    (other / "state.json").write_text(json.dumps({**state, "model": "lenet5"}))
    return damaged, other


@pytest.fixture(scope="module")
def damaged_partition(partition_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the partition where shard0 is not a zip file and shard1 holds other arrays, digests updated."""
    out = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(partition_dir, out)
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(2), b=np.ones(2))
    contents = {"shard0": b"these bytes are no npz archive", "shard1": buffer.getvalue()}
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] in contents:
            (out / entry["file"]).write_bytes(contents[entry["name"]])
            entry["sha256"] = hashlib.sha256(contents[entry["name"]]).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datasets a data holder may pass by mistake: a CSV without the label column, one with only a header, one
    with words among the features, an image folder whose images cannot be decoded, a spreadsheet."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "no-label.csv").write_text("age,weight,target\n30,70,0\n40,80,1\n")
    (root / "empty.csv").write_text("age,label\n")
    (root / "words.csv").write_text("age,city,label\n30,Paris,0\n")
    (root / "images" / "cat").mkdir(parents=True)
    for k in range(2):
        (root / "images" / "cat" / f"{k}.png").write_bytes(b"not a png")
    (root / "data.xlsx").write_bytes(b"PK\x03\x04")
    return root


@pytest.fixture(scope="module")
def busy_endpoint() -> Iterator[str]:
    """A loopback endpoint some socket already holds."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(LOOPBACK)
    yield sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    ctx.term()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A directory with the broker's key pair, and one whose only *.key file is garbage."""
    good = tmp_path_factory.mktemp("keys")
    generate_key_pair(good, "broker")
    bad = tmp_path_factory.mktemp("badkeys")
    (bad / "worker.key").write_text("not a key\n")
    return good, bad


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def output_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (run.stdout + "\n" + run.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[c.name for c in MISTAKES])
def test_mistake_is_one_line_and_writes_nothing(mistake: Mistake, tmp_path: Path, partition_dir: Path,
                                                damaged_partition: Path, busy_endpoint: str,
                                                keys: tuple[Path, Path], old_runs: tuple[Path, Path],
                                                bad_inputs: Path) -> None:
    (tmp_path / "a-file").write_text("a file where a directory is expected\n")
    names = {"tmp": str(tmp_path), "file": str(tmp_path / "a-file"), "part": str(partition_dir),
             "damaged": str(damaged_partition), "busy": busy_endpoint, "keys": str(keys[0]),
             "badkeys": str(keys[1]), "damaged_run": str(old_runs[0]), "other_run": str(old_runs[1]),
             "bad": str(bad_inputs)}
    args = [arg.format(**names) for arg in mistake.args]
    before = tree(tmp_path)
    run = subprocess.run([sys.executable, "-m", "fedctl", *args], cwd=tmp_path,
                         env={**fedctl_env(tmp_path), **mistake.env}, capture_output=True, text=True,
                         timeout=60, check=False)
    shown = f"fedctl {' '.join(args)}\nexit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert "Traceback" not in run.stdout + run.stderr, shown
    assert run.returncode == mistake.code != 0, shown
    lines = output_lines(run)
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("error: ") and " — " in line, shown  # the cause, then the fix
    for needle in mistake.needles:
        assert needle.format(**names) in line, f"{needle!r} missing\n{shown}"
    for word in mistake.absent:
        assert word not in line, f"{word!r} present\n{shown}"
    assert tree(tmp_path) == before, f"files were left behind: {sorted(tree(tmp_path) - before)}\n{shown}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads and writes any directory")
def test_permission_denied(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    read_only, unreadable = tmp_path / "read-only", tmp_path / "unreadable"
    read_only.mkdir()
    unreadable.mkdir()
    shutil.copy(keys[0] / "broker.key", unreadable)
    read_only.chmod(0o500)
    unreadable.chmod(0o000)
    try:
        for args, needle in [
            (("partition", "--dataset", "mnist-sample", "--iid", "--out", str(read_only / "out")), "not writable"),
            (("serve", "--bind", LOOPBACK, "--state-dir", str(tmp_path / "s"), "--secret-key",
              str(keys[0] / "broker.key_secret"), "--allowed-keys", str(unreadable)), "cannot be read"),
        ]:
            run = subprocess.run([sys.executable, "-m", "fedctl", *args], cwd=tmp_path, env=fedctl_env(tmp_path),
                                 capture_output=True, text=True, timeout=60, check=False)
            lines = output_lines(run)
            assert run.returncode == CONFIG and len(lines) == 1, run.stderr
            assert needle in lines[0] and "Permission denied" in lines[0] and " — " in lines[0], lines[0]
    finally:
        read_only.chmod(0o700)
        unreadable.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read-only", "unreadable"]
    assert list(read_only.iterdir()) == []


def _options(command: click.Command, path: str) -> Iterator[tuple[str, click.Option]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, f"{path} {name}")
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            yield path, param


def test_every_option_has_help() -> None:
    missing = [f"{path} {param.opts[0]}" for path, param in _options(cli, "fedctl") if not param.help]
    assert missing == []


def test_every_number_option_has_a_range() -> None:
    """A plain int or float option accepts -1 and 0 everywhere; each says which numbers make sense."""
    plain = [f"{path} {param.opts[0]}" for path, param in _options(cli, "fedctl")
             if param.type in (click.INT, click.FLOAT)]
    assert plain == []


def test_serve_help_names_every_policy() -> None:
    doc = cli.get_command(click.Context(cli), "serve").help or ""
    assert "ssp" in doc and "async" in doc and "synchronous rounds" in doc


def test_an_error_inside_a_task_group_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """asyncio.TaskGroup wraps a task's FedctlError in an ExceptionGroup; the user still sees its one line."""
    async def refuse() -> None:
        raise ConfigError("the cause", "the fix")

    async def run() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(refuse())

    def fail(*_: object, **__: object) -> None:
        asyncio.run(run())

    monkeypatch.setattr(cli, "main", fail)
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == ConfigError.exit_code
    assert capsys.readouterr().err == "error: the cause — the fix\n"


def test_an_os_error_on_a_file_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The environment's refusal (disk full) is not a bug: one line naming the file, no traceback."""
    def fail(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device", "runs/x/model-3.npz")

    monkeypatch.setattr(cli, "main", fail)
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: runs/x/model-3.npz: No space left on device — ") and err.count("\n") == 1, err


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "main", fail)
    with pytest.raises(ZeroDivisionError):
        main([])
