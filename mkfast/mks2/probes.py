"""Linear read-outs of a class attribute (the MKS2 demo's colour) that must generalise to held-out classes.

A probe fitted on a handful of classes, each a tight cluster of points, can separate the training
classes along directions that name each class rather than the attribute they share, and then
score chance on new classes. Two things here guard against reading that as "no signal":

- ``class_held_out_probe`` chooses the L2 strength of its logistic regression by
  cross-validation over held-out classes (the way it will be used: on classes it has not
  seen), not by scikit-learn's default. Each fold holds out one class of every attribute
  value, as the demo's splits do: leaving out a single class would leave the other value in
  the majority, and a strongly regularised probe, which leans to the majority, would be
  scored wrong on every fold and never chosen;
- ``attribute_share`` says how much of the between-class spread the attribute explains
  (1.0: classes differ by the attribute only; a random half/half labelling of ten classes
  explains 1/9 on average), the quantity a shared-direction read-out needs to be large.
"""

from __future__ import annotations

import numpy as np

# Inverse L2 strengths tried (scikit-learn's C); the default 1.0 is among them.
PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_ITERATIONS = 5000


def class_held_out_probe(train_x: np.ndarray, train_y: np.ndarray, train_classes: np.ndarray):
    """A fitted LogisticRegression whose C (from PROBE_C_GRID) scores best in cross-validation where
    fold k holds out the k-th class (in sorted order) of every value of ``train_y``; ties go to the
    stronger regularisation. ``train_classes``: each row's class. Needs two classes of each value."""
    from sklearn.linear_model import LogisticRegression

    if len(train_x) != len(train_y) or len(train_y) != len(train_classes):
        raise ValueError(f"class_held_out_probe: train_x, train_y and train_classes need one row each, got "
                         f"{len(train_x)}, {len(train_y)} and {len(train_classes)}")
    by_value = {value: sorted(set(train_classes[train_y == value].tolist()))
                for value in sorted(set(train_y.tolist()))}
    folds = min(len(classes) for classes in by_value.values())
    if len(by_value) < 2 or folds < 2:
        counts = {value: len(classes) for value, classes in by_value.items()}
        raise ValueError(f"class_held_out_probe: train_y needs two values with two classes each, "
                         f"got {counts}")
    held_out_masks = [np.isin(train_classes, [classes[fold] for classes in by_value.values()])
                      for fold in range(folds)]

    def probe(strength: float, rows: np.ndarray):
        return LogisticRegression(C=strength, max_iter=MAX_ITERATIONS).fit(train_x[rows], train_y[rows])

    def cross_validated(strength: float) -> float:
        return float(np.mean([probe(strength, ~mask).score(train_x[mask], train_y[mask])
                              for mask in held_out_masks]))

    scores = [cross_validated(strength) for strength in PROBE_C_GRID]
    return probe(PROBE_C_GRID[int(np.argmax(scores))], np.ones(len(train_y), dtype=bool))


def attribute_share(features: np.ndarray, classes: np.ndarray, attribute_of: dict[int, int]) -> float:
    """Share of the between-class variance of ``features`` (N, D) that ``attribute_of[class]`` explains:
    sum over classes of |mean of the class's attribute group - grand mean|^2 over sum of
    |class mean - grand mean|^2, the class means weighted alike."""
    labels = sorted(set(classes.tolist()))
    means = np.stack([features[classes == label].mean(axis=0) for label in labels])
    centre = means.mean(axis=0)
    attribute = np.array([attribute_of[label] for label in labels])
    group_means = {value: means[attribute == value].mean(axis=0) for value in set(attribute.tolist())}
    explained = sum(float(np.sum((group_means[value] - centre) ** 2)) for value in attribute.tolist())
    total = float(np.sum((means - centre) ** 2))
    return explained / total if total > 0 else 0.0


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (what a cosine similarity, as in L_t2i, sees)."""
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
