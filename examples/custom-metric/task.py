"""An MNIST classifier whose evaluations report macro-F1 and the confusion matrix's per-class counts, for fedctl --task.

``metrics(y, scores)`` runs on every worker's held-out examples (federated evaluation, ``fed_eval_*`` in
metrics.jsonl). It must return plain floats, at most 64 of them with accuracy and loss (the protocol's limit on an
evaluation's metrics), and the broker combines each one as the mean over the workers weighted by their numbers of
examples. So it returns:

* ``macro_f1``: the macro-F1 of that worker's own held-out examples (the broker's ``fed_eval_macro_f1`` is then the
  example-weighted mean of the workers' macro-F1s, which is not the macro-F1 of all their examples together);
* ``tp_<c>``, ``fp_<c>``, ``fn_<c>`` for each class c: the confusion matrix's diagonal and its margins, as fractions
  of the examples evaluated. A weighted mean of fractions is the fraction over all the workers' examples, so
  ``fed_eval_tp_<c>`` etc. are exact pooled values, and per-class precision, recall and F1 and the pooled macro-F1
  follow from them (report.py). The whole 10 × 10 matrix would be 100 numbers, more than an evaluation may carry.
"""

import numpy as np
from torch import nn

name = "mnist-macro-f1"
CLASSES = 10


def model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, CLASSES))


def metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    pred = scores.argmax(1)
    n = max(len(y), 1)
    out: dict[str, float] = {}
    f1s = []
    for c in range(CLASSES):
        tp = float(np.sum((pred == c) & (y == c)))
        fp = float(np.sum((pred == c) & (y != c)))
        fn = float(np.sum((pred != c) & (y == c)))
        out[f"tp_{c}"], out[f"fp_{c}"], out[f"fn_{c}"] = tp / n, fp / n, fn / n
        if tp + fp + fn > 0:  # a class absent from these examples and never predicted has no F1
            f1s.append(2 * tp / (2 * tp + fp + fn))
    out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return out
