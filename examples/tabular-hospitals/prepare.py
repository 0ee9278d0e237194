"""Write scikit-learn's bundled breast-cancer data (569 patients, no download) as one CSV table.

Columns: the 30 features under their scikit-learn names, then ``diagnosis`` (0 malignant, 1 benign).
"""

import argparse
import csv

from sklearn.datasets import load_breast_cancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="breast_cancer.csv", help="the CSV file to write")
    out = parser.parse_args().out
    data = load_breast_cancer()
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "diagnosis"])
        for features, label in zip(data.data, data.target):
            writer.writerow([*(repr(float(v)) for v in features), int(label)])
    print(f"wrote {out}: {len(data.target)} rows, {data.data.shape[1]} features + diagnosis")


if __name__ == "__main__":
    main()
