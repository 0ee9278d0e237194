"""Read the task's metrics back from a run: per round, and per class for the last federated evaluation.

* From metrics.jsonl: ``test_accuracy`` (the broker's own evaluation on test.npz), ``fed_eval_accuracy`` and
  ``fed_eval_macro_f1`` (the workers' held-out examples), and the pooled macro-F1 computed from
  ``fed_eval_tp_<c>``, ``fed_eval_fp_<c>``, ``fed_eval_fn_<c>``.
* The last federated evaluation per class: precision, recall and F1 over all the workers' held-out examples.
* The exported model (``fedctl export --format pt``) loaded with plain PyTorch into the task's ``model()``: its full
  10 × 10 confusion matrix and the task's metrics on the partition's test split.

``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from fedctl.data import load_shard


def load_task(path: Path):
    spec = importlib.util.spec_from_file_location("task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_class(record: dict, prefix: str, classes: int) -> list[dict[str, float]]:
    """Precision, recall and F1 of each class from the ``PREFIXtp_c``, ``fp_c``, ``fn_c`` fractions of a record."""
    rows = []
    for c in range(classes):
        tp, fp, fn = (record[f"{prefix}{kind}_{c}"] for kind in ("tp", "fp", "fn"))
        rows.append({"class": c, "support": tp + fn, "present": tp + fp + fn > 0,
                     "precision": tp / (tp + fp) if tp + fp else 0.0,
                     "recall": tp / (tp + fn) if tp + fn else 0.0,
                     "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0})
    return rows


def pooled_macro_f1(rows: list[dict[str, float]]) -> float:
    present = [r["f1"] for r in rows if r["present"]]  # as the task's macro_f1: classes seen or predicted
    return float(np.mean(present)) if present else 0.0


def confusion(y: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (y, pred), 1)
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True, help="the broker's --state-dir")
    parser.add_argument("--data-dir", type=Path, required=True, help="the partition, for its test split")
    parser.add_argument("--pt", type=Path, required=True, help="`fedctl export --format pt` of the run's model")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task)
    classes = task.CLASSES

    records = [json.loads(line) for line in (args.state_dir / "metrics.jsonl").read_text().splitlines() if line]
    print(f"{'round':>5} {'test_accuracy':>13} {'fed_eval_accuracy':>17} {'fed_eval_macro_f1':>17} "
          f"{'pooled macro-F1':>15}")
    for rec in records:
        pooled = (pooled_macro_f1(per_class(rec, "fed_eval_", classes))
                  if rec.get("fed_eval_tp_0") is not None else None)
        cells = [rec.get("test_accuracy"), rec.get("fed_eval_accuracy"), rec.get("fed_eval_macro_f1"), pooled]
        print(f"{rec['round']:>5} " + " ".join(f"{'-' if v is None else f'{v:.4f}':>{w}}"
                                               for v, w in zip(cells, (13, 17, 17, 15))))

    last = [rec for rec in records if rec.get("fed_eval_tp_0") is not None][-1]
    rows = per_class(last, "fed_eval_", classes)
    print(f"\nround {last['round']}, federated evaluation on {last['fed_eval_examples']} held-out examples of "
          f"{last['fed_eval_workers']} workers, per class:")
    print(f"{'class':>5} {'share':>6} {'precision':>9} {'recall':>6} {'F1':>6}")
    for r in rows:
        print(f"{r['class']:>5} {r['support']:>6.3f} {r['precision']:>9.3f} {r['recall']:>6.3f} {r['f1']:>6.3f}")

    net = task.model()
    net.load_state_dict(torch.load(args.pt))
    test = load_shard(args.data_dir, "test")
    with torch.no_grad():
        scores = net.eval()(torch.from_numpy(test.x)).numpy()
    matrix = confusion(test.y, scores.argmax(1), classes)
    test_metrics = task.metrics(test.y, scores)
    print(f"\nthe exported model on the test split ({len(test.y)} examples): accuracy "
          f"{np.trace(matrix) / matrix.sum():.4f}, macro-F1 {test_metrics['macro_f1']:.4f}; confusion matrix "
          f"(rows: true class, columns: predicted):")
    print("      " + " ".join(f"{c:>4}" for c in range(classes)))
    for c in range(classes):
        print(f"{c:>5} " + " ".join(f"{v:>4}" for v in matrix[c]))

    if args.json:
        args.json.write_text(json.dumps({
            "rounds": len(records), "last_fed_eval_round": last["round"],
            "fed_eval_accuracy": last["fed_eval_accuracy"], "fed_eval_macro_f1": last["fed_eval_macro_f1"],
            "fed_eval_pooled_macro_f1": pooled_macro_f1(rows), "fed_eval_per_class": rows,
            "test_accuracy": records[-1].get("test_accuracy"),
            "export_test_accuracy": float(np.trace(matrix) / matrix.sum()),
            "export_test_macro_f1": test_metrics["macro_f1"], "export_confusion": matrix.tolist(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
