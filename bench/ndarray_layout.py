"""fedctl's dense tensor frame against msgpack-numpy's ndarray layout: encode + decode throughput and frame size.

The question (issue 11, item 5): should dense frames adopt msgpack-numpy's map layout (``{b"nd": True, b"type":
"<f4", b"kind": b"", b"shape": [...], b"data": bin}``, under the frame's name) so that a peer packing arrays with
msgpack-numpy produces valid frames? Three codecs, on the same tensors, per frame (the header is the same for all):

* ``fedctl`` — :func:`fedctl.wire.encode_tensor` / :func:`fedctl.wire.decode_tensor` (the full checks of
  docs/protocol.md §4: dtype allow-list, shape, declared vs actual bytes, finite values);
* ``msgpack-numpy`` — ``msgpack.packb({"name": n, "array": a}, default=msgpack_numpy.encode)`` and
  ``unpackb(object_hook=msgpack_numpy.decode)``: its own decoder, which checks nothing and unpickles ``kind: "O"``;
* ``msgpack-numpy layout, checked`` — the same bytes decoded the way fedctl would have to if it adopted the layout:
  no object hook, then the same checks as fedctl's (allow-listed ``type``, ``kind`` empty, shape, sizes, finite).

Workloads: a 5 MB float32 model (5 tensors) and 256 small tensors of 64 float32 (a message's worth, MAX_TENSORS).
Median of interleaved repeats, in a fresh process with glibc malloc pinned to bench/codec.py's *warm* regime (freed
buffers reused, no page faults): otherwise whether a multi-megabyte buffer is re-faulted depends on which codec ran
just before, and that, not the codec, decides the 5 MB numbers. Writes bench/results/msgpack_numpy.{json,md}.

    .venv/bin/python bench/ndarray_layout.py [--repeats 40]

(Not named msgpack_numpy.py: run as a script, that file would shadow the package it measures.) msgpack-numpy is
not a dependency of fedctl: ``.venv/bin/pip install msgpack-numpy`` first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

try:
    import msgpack_numpy  # not a dependency of fedctl (docs/protocol.md §4.9): pip install msgpack-numpy
except ImportError:  # pragma: no cover
    raise SystemExit("this benchmark compares against msgpack-numpy: .venv/bin/pip install msgpack-numpy") from None

from fedctl.wire import decode_tensor, encode_tensor
from fedctl.wire.constants import ALLOWED_DTYPES, MAX_NDIM

RESULTS = Path(__file__).resolve().parent / "results"
WARM_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
"""bench/codec.py's *warm* allocator regime."""
Codec = tuple[Callable[[dict[str, np.ndarray]], list[bytes]], Callable[[list[bytes]], dict[str, Any]]]


def workloads() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    model_shapes = {"conv.weight": (64, 3, 5, 5), "fc1.weight": (1024, 1200), "fc1.bias": (1024,),
                    "fc2.weight": (10, 1024), "fc2.bias": (10,)}
    model = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in model_shapes.items()}
    small = {f"layer{i}.w": rng.normal(0, 0.05, 64).astype(np.float32) for i in range(256)}
    return {"model_5MB": model, "small_256x64": small}


# ----------------------------------------------------------------------------------------------- the codecs
def fedctl_encode(tensors: dict[str, np.ndarray]) -> list[bytes]:
    return [encode_tensor(n, t) for n, t in tensors.items()]


def fedctl_decode(frames: list[bytes]) -> dict[str, Any]:
    return dict(decode_tensor(frame) for frame in frames)


def mn_encode(tensors: dict[str, np.ndarray]) -> list[bytes]:
    return [msgpack.packb({"name": n, "array": t}, default=msgpack_numpy.encode, use_bin_type=True)
            for n, t in tensors.items()]


def mn_decode(frames: list[bytes]) -> dict[str, np.ndarray]:
    out = {}
    for frame in frames:
        body = msgpack.unpackb(frame, object_hook=msgpack_numpy.decode, raw=False)
        out[body["name"]] = body["array"]
    return out


def mn_checked_decode(frames: list[bytes]) -> dict[str, np.ndarray]:
    """What fedctl would need to accept msgpack-numpy's layout safely: its rules, no object hook, no pickle."""
    out = {}
    for frame in frames:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_array_len=MAX_NDIM, max_map_len=16,
                               max_str_len=1024, max_ext_len=0)
        nd = body["array"]
        dtype, shape, data = nd[b"type"], nd[b"shape"], nd[b"data"]
        if nd.get(b"nd") is not True or nd.get(b"kind") != b"" or dtype not in ALLOWED_DTYPES:
            raise ValueError("not an allowed ndarray")
        if len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("bad shape")
        dt = np.dtype(dtype)
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * dt.itemsize:
            raise ValueError("bad size")
        arr = np.frombuffer(data, dt).reshape(shape)
        if not np.isfinite(arr).all():
            raise ValueError("non-finite")
        out[body["name"]] = arr
    return out


CODECS: dict[str, Codec] = {"fedctl": (fedctl_encode, fedctl_decode),
                            "msgpack-numpy": (mn_encode, mn_decode),
                            "msgpack-numpy layout, checked": (mn_encode, mn_checked_decode)}


# ----------------------------------------------------------------------------------------------- measuring
def measure(tensors: dict[str, np.ndarray], repeats: int, warmup: int = 3) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {c: {"encode": [], "decode": []} for c in CODECS}
    sizes = {}
    for i in range(warmup + repeats):
        for codec, (enc, dec) in CODECS.items():  # interleaved, so load on the machine hits every codec alike
            t0 = time.perf_counter()
            frames = enc(tensors)
            t1 = time.perf_counter()
            back = dec(frames)
            t2 = time.perf_counter()
            if i >= warmup:
                times[codec]["encode"].append(t1 - t0)
                times[codec]["decode"].append(t2 - t1)
            else:
                assert all(np.array_equal(back[n], t) for n, t in tensors.items()), codec  # the bench itself
                sizes[codec] = sum(len(f) for f in frames)
    payload = sum(t.nbytes for t in tensors.values())
    out: dict[str, Any] = {"tensors": len(tensors), "tensor_bytes": payload, "repeats": repeats, "codecs": {}}
    for codec, phases in times.items():
        enc_s, dec_s = statistics.median(phases["encode"]), statistics.median(phases["decode"])
        out["codecs"][codec] = {
            "wire_bytes": sizes[codec], "overhead_bytes_per_frame": (sizes[codec] - payload) / len(tensors),
            "encode_us": enc_s * 1e6, "decode_us": dec_s * 1e6, "roundtrip_us": (enc_s + dec_s) * 1e6,
            "roundtrip_MB_per_s": payload / (enc_s + dec_s) / 1e6,
            "roundtrip_frames_per_s": len(tensors) / (enc_s + dec_s)}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# fedctl dense frames vs msgpack-numpy's ndarray layout", "",
             f"{result['when']} · {result['machine']} · numpy {np.__version__} · msgpack "
             f"{'.'.join(map(str, msgpack.version))} · msgpack-numpy {result['msgpack_numpy']} · load average "
             f"{result['load_average_1min']:.2f} at start", "",
             "Per frame encode + decode of the same float32 tensors (median of interleaved repeats, one fresh process, "
             "malloc in the warm regime of bench/codec.py). "
             "*checked* = msgpack-numpy's bytes decoded with fedctl's rules (no object hook, no pickle).", "",
             "| workload | codec | wire bytes | overhead / frame | encode | decode | round trip | throughput |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload, res in result["workloads"].items():
        for codec, r in res["codecs"].items():
            lines.append(f"| {workload} ({res['tensors']} tensors) | {codec} | {r['wire_bytes']:,} | "
                         f"{r['overhead_bytes_per_frame']:.0f} B | {r['encode_us']:,.0f} µs | {r['decode_us']:,.0f} µs "
                         f"| {r['roundtrip_us']:,.0f} µs | {r['roundtrip_MB_per_s']:,.0f} MB/s, "
                         f"{r['roundtrip_frames_per_s']:,.0f} frames/s |")
    return "\n".join(lines) + "\n"


def measure_all(repeats: int) -> dict[str, Any]:
    return {name: measure(t, repeats if name == "model_5MB" else repeats * 5) for name, t in workloads().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--here", action="store_true", help="measure in this process and print JSON only")
    args = parser.parse_args()
    if args.here:
        print(json.dumps(measure_all(args.repeats)))
        return
    child = subprocess.run([sys.executable, __file__, "--here", "--repeats", str(args.repeats)], check=True,
                           capture_output=True, text=True, env={**os.environ, **WARM_MALLOC}, timeout=900)
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": f"{os.cpu_count()} CPUs ({platform.machine()}) · Python {platform.python_version()}",
              "msgpack_numpy": importlib.metadata.version("msgpack-numpy"), "malloc_env": WARM_MALLOC,
              "load_average_1min": os.getloadavg()[0], "workloads": json.loads(child.stdout)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "msgpack_numpy.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "msgpack_numpy.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
