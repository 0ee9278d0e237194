"""Codec throughput: ``make``+``encode`` and ``decode`` (with full validation) of a dense ``push`` of a whole model.

Pure CPU, no sockets. Throughput is the model's tensor bytes (float32 payload, not counting msgpack framing)
divided by the median time over ``repeats`` timed iterations, after a warm-up.

Each message allocates a few buffers of ~0.4 MB (the packed frame, msgpack's packing buffer, the bytes a bin field
decodes to). Whether glibc hands those back to the OS between messages (and the next message page-faults them in
again) depends on the process's allocation history, and changes the MLP's numbers about fourfold: importing one
more module was enough to flip it. So the benchmark runs in fresh subprocesses with the allocator pinned to each
of two regimes (``REGIMES``) instead of reporting whichever one the parent process happened to be in.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from fedctl.models import get_model, init_params
from fedctl.wire import decode, encode, make, payload_bytes

TARGET_ROUNDTRIP_GBPS = 1.0  # for the MLP
REGIMES = {
    # freed buffers stay in the heap and the next message reuses them: no page faults in steady state
    "warm": {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"},
    # the top of the heap is returned to the OS after every message and faulted in again (seen in real processes)
    "trimmed": {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "131072"},
}


def _push(params: dict[str, Any]) -> Any:
    return make("push", 7, tensors=params, round=1, base_version=0, seq=0, kind="weights", num_examples=600,
                metrics={"train_loss": 0.5})


def measure_model(name: str, repeats: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Median encode, decode and round-trip times of one dense push of model ``name``, and their throughput."""
    spec = get_model(name)
    params = init_params(spec, seed=0)
    encode_s: list[float] = []
    decode_s: list[float] = []
    roundtrip_s: list[float] = []
    frames = encode(_push(params))
    faults = 0
    for i in range(warmup + repeats):
        if i == warmup:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        frames = encode(_push(params))
        t1 = time.perf_counter()
        decoded = decode(frames)
        t2 = time.perf_counter()
        if i >= warmup:
            encode_s.append(t1 - t0)
            decode_s.append(t2 - t1)
            roundtrip_s.append(t2 - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert set(decoded.tensors) == set(params)  # a sanity check on the benchmark itself, not on input
    tensor_bytes = spec.nbytes

    def rate(times: list[float]) -> dict[str, float]:
        med = statistics.median(times)
        return {"median_us": med * 1e6, "MB_per_s": tensor_bytes / med / 1e6, "GB_per_s": tensor_bytes / med / 1e9}

    result = {"model": name, "params": spec.num_params, "tensor_bytes": tensor_bytes,
              "wire_bytes": payload_bytes(frames), "tensors": len(params), "repeats": repeats,
              "page_faults_per_roundtrip": faults / repeats,
              "encode": rate(encode_s), "decode": rate(decode_s), "roundtrip": rate(roundtrip_s)}
    return result


def run_here(repeats: int = 200) -> dict[str, Any]:
    """Codec results for the MLP and LeNet-5 in this process, whatever state its heap is in."""
    return {name: measure_model(name, repeats) for name in ("mlp", "lenet5")}


def run(repeats: int = 200) -> dict[str, Any]:
    """Both models in each allocator regime (fresh subprocesses); the MLP's warm round trip is judged against
    the 1 GB/s target, and the trimmed one reported beside it."""
    regimes = {}
    for regime, malloc_env in REGIMES.items():
        proc = subprocess.run([sys.executable, __file__, "--repeats", str(repeats)], capture_output=True, text=True,
                              env={**os.environ, **malloc_env}, check=True, timeout=600)
        regimes[regime] = {"malloc_env": malloc_env, "models": json.loads(proc.stdout)}
    verdicts = {regime: regimes[regime]["models"]["mlp"]["roundtrip"]["GB_per_s"] for regime in regimes}
    return {"regimes": regimes,
            "target": {"what": "MLP encode+decode round trip", "GB_per_s": TARGET_ROUNDTRIP_GBPS,
                       "measured_GB_per_s": verdicts,
                       "pass": {regime: gbps >= TARGET_ROUNDTRIP_GBPS for regime, gbps in verdicts.items()}}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="codec throughput in this process; prints JSON")
    parser.add_argument("--repeats", type=int, default=200)
    print(json.dumps(run_here(parser.parse_args().repeats)))
