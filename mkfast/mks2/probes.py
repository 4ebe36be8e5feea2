"""Linear read-outs of a class attribute (the MKS2 demo's colour) that must generalise to held-out classes.

A probe fitted on a handful of classes, each a tight cluster of points, can separate the training
classes along directions that name each class rather than the attribute they share, and then
score chance on new classes. Two things here guard against reading that as "no signal":

- ``class_held_out_probe`` chooses the L2 strength of its logistic regression by
  leave-one-class-out cross-validation on the training classes (the way it will be used:
  on classes it has not seen), not by scikit-learn's default;
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
    """A fitted LogisticRegression whose C (from PROBE_C_GRID) scores best in leave-one-class-out
    cross-validation over ``train_classes`` (one class label per row); ties go to the stronger
    regularisation. Needs at least two training classes of each attribute value."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut

    if len(train_x) != len(train_y) or len(train_y) != len(train_classes):
        raise ValueError(f"class_held_out_probe: train_x, train_y and train_classes need one row each, got "
                         f"{len(train_x)}, {len(train_y)} and {len(train_classes)}")
    search = GridSearchCV(LogisticRegression(max_iter=MAX_ITERATIONS), {"C": list(PROBE_C_GRID)},
                          cv=LeaveOneGroupOut())
    return search.fit(train_x, train_y, groups=train_classes).best_estimator_


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
