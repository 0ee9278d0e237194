"""After the federation: compare it with centralised training, and check the exported model.

* **Centralised baselines**, trained on the union of the five hospitals' training examples (each hospital's
  examples minus its `--holdout`, exactly the ones the federation trained on): scikit-learn's LogisticRegression on
  standardised features, and the task's own MLP trained in one place with the same optimiser and learning rate.
* **The federated model**: the `.pt` file of `fedctl export`, loaded with plain PyTorch into the task's `model()`
  (strict `load_state_dict`), and the run's `fed_eval_accuracy` from metrics.jsonl.
* Every model is scored on the same two sets: the partition's test split (test.npz, which nobody trained on and
  the broker never saw) and the hospitals' held-out examples pooled (what federated evaluation scores).
* **The export round trip**: the `.pt` model's scores on the test split equal a numpy forward pass of the npz
  export's arrays (the broker's model, cast to float32).

Prints a table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedctl.data import list_shards, load_shard, with_holdout


def load_task(path: Path):
    spec = importlib.util.spec_from_file_location("task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hospital_data(data_dir: Path, holdout: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, held-out x, held-out y) of all hospitals, split as `fedctl join --holdout` splits them."""
    shards = [with_holdout(load_shard(data_dir, name), holdout, seed=0) for name in list_shards(data_dir)]
    train_x = np.concatenate([s.x for s in shards])
    train_y = np.concatenate([s.y for s in shards])
    held = [s for s in shards if s.holdout_y is not None]
    return train_x, train_y, np.concatenate([s.holdout_x for s in held]), np.concatenate([s.holdout_y for s in held])


def train_centrally(task, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float) -> torch.nn.Module:
    """The task's model trained on all the data in one place: the same optimiser, lr and batch size, seeded."""
    torch.manual_seed(0)
    net = task.model()
    opt = task.optimizer(net.parameters(), lr)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[batch]), ys[batch]).backward()
            opt.step()
    return net.eval()


def scores_of(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def numpy_forward(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The task's model in numpy: Standardize, Linear, ReLU, Linear."""
    mean, sq_mean = arrays["0.mean"], arrays["0.sq_mean"]
    h = (x - mean) / np.sqrt(np.maximum(sq_mean - mean * mean, 0.0) + 1e-5)
    h = np.maximum(h @ arrays["1.weight"].T + arrays["1.bias"], 0.0)
    return h @ arrays["3.weight"].T + arrays["3.bias"]


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    return float((scores.argmax(1) == y).mean())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="the partition (`fedctl partition --out`)")
    parser.add_argument("--holdout", type=float, required=True, help="the workers' `fedctl join --holdout`")
    parser.add_argument("--state-dir", type=Path, required=True, help="the broker's --state-dir")
    parser.add_argument("--pt", type=Path, required=True, help="`fedctl export --format pt` output")
    parser.add_argument("--npz", type=Path, required=True, help="`fedctl export --format npz` of the same model")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the centralised MLP (the run's rounds)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = load_task(args.task)
    train_x, train_y, held_x, held_y = hospital_data(args.data_dir, args.holdout)
    test = load_shard(args.data_dir, "test")

    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train_x, train_y)
    # The same, also trained on the held-out examples: what a centralised analyst with every record would fit.
    logreg_all = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        np.concatenate([train_x, held_x]), np.concatenate([train_y, held_y]))
    mlp = train_centrally(task, train_x, train_y, args.epochs, args.batch_size, args.lr)
    federated = task.model()
    federated.load_state_dict(torch.load(args.pt))  # plain PyTorch, strict: every tensor of model() is in the file

    with np.load(args.npz) as npz:
        arrays = {name: npz[name] for name in npz.files}
    fed_scores = scores_of(federated, test.x)
    np_scores = numpy_forward(arrays, test.x)
    export_ok = bool(np.array_equal(fed_scores.argmax(1), np_scores.argmax(1))
                     and np.allclose(fed_scores, np_scores, rtol=1e-4, atol=1e-4))

    metrics = [json.loads(line) for line in (args.state_dir / "metrics.jsonl").read_text().splitlines() if line]
    evaluated = [m for m in metrics if m.get("fed_eval_accuracy") is not None]
    best = json.loads((args.state_dir / "best.json").read_text()) if (args.state_dir / "best.json").exists() else {}
    results = {
        "train_examples": int(len(train_y)), "held_out_examples": int(len(held_y)), "test_examples": int(len(test.y)),
        "logreg": {"test": logreg.score(test.x, test.y), "held_out": logreg.score(held_x, held_y)},
        "logreg_all": {"test": logreg_all.score(test.x, test.y), "held_out": None},
        "mlp_centralised": {"test": accuracy(scores_of(mlp, test.x), test.y),
                            "held_out": accuracy(scores_of(mlp, held_x), held_y)},
        "federated_export": {"test": accuracy(fed_scores, test.y), "held_out": accuracy(scores_of(federated, held_x),
                                                                                         held_y)},
        "fed_eval_accuracy": {"last": evaluated[-1]["fed_eval_accuracy"] if evaluated else None,
                              "max": max(m["fed_eval_accuracy"] for m in evaluated) if evaluated else None,
                              "exported": next((m["fed_eval_accuracy"] for m in evaluated
                                                if m["round"] == best.get("round")), None)},
        "rounds": len(metrics), "best": best, "export_matches_numpy": export_ok,
    }
    results["gap_points"] = 100 * (results["federated_export"]["test"] - results["logreg"]["test"])

    print(f"{'model':<38} {'test split':>10} {'held-out':>9}")
    print(f"{'':<38} {'n=' + str(len(test.y)):>10} {'n=' + str(len(held_y)):>9}")
    rows = [("centralised logistic regression", "logreg"), ("  the same, held-out examples too", "logreg_all"),
            ("centralised MLP (the task's model)", "mlp_centralised"),
            ("federated MLP (fedctl export --best)", "federated_export")]
    for label, key in rows:
        held = results[key]["held_out"]
        print(f"{label:<38} {results[key]['test']:>10.3f} {'-' if held is None else f'{held:.3f}':>9}")
    fed_eval = results["fed_eval_accuracy"]
    print(f"fed_eval_accuracy in metrics.jsonl: {_fmt(fed_eval['exported'])} in round {best.get('round')} (the "
          f"exported model, lowest {best.get('metric')}), {_fmt(fed_eval['last'])} in the last round "
          f"{len(metrics)}, at most {_fmt(fed_eval['max'])}")
    print(f"federated minus centralised logistic regression, test split: {results['gap_points']:+.1f} points")
    print(f"exported .pt loads into model() and its scores equal a numpy forward of the npz export: {export_ok}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
