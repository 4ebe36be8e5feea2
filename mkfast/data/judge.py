"""An independent judge of digit images: a scikit-learn classifier on pixels, and a kernel distance.

The demos score what a model generates with something that took no part in making it: the
RA-CM3 demo's CLIP retrieves and reranks, so it must not also grade. The judge is an RBF
support-vector classifier fitted on the training split's pixels, average-pooled back to
the digits' native 8x8 grey (64 features), apart from every model under test. Its accuracy
on held-out real images is the ceiling a generated image can be compared with.

The kernel distance is KID's statistic (Binkowski et al. 2018): the unbiased squared MMD
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, on the same 64 pooled pixels.
Unlike FID it needs no covariance estimate, so it stays defined for a few dozen images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NATIVE_SIDE = 8  # sklearn's digits are 8x8


def judge_features(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, 64) float64: grey, average-pooled to 8x8."""
    if images.dim() != 4:
        raise ValueError(f"judge_features: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    grey = images.detach().float().cpu().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, NATIVE_SIDE).flatten(1).double()


class DigitJudge:
    """Predicts the digit of (N, C, H, W) images; fitted once on real labelled images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from sklearn.svm import SVC

        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"DigitJudge: {images.shape[0]} images for {labels.shape[0]} labels")
        self.classifier = SVC(kernel="rbf", gamma="scale").fit(judge_features(images).numpy(),
                                                              labels.cpu().numpy())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(self.classifier.predict(judge_features(images).numpy())).long()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
        """Fraction of images judged to be their label's digit (nan for no images)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() == 0:
            return float("nan")
        return float((self.predict(images) == labels).double().mean())


def kernel_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Unbiased squared MMD, cubic polynomial kernel, on :func:`judge_features` (KID's statistic).

    0 in expectation when both sets come from one distribution; may dip below 0 by chance.
    """
    x, y = judge_features(real), judge_features(generated)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"kernel_distance: needs at least 2 images per set, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    dimension = x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / dimension + 1.0) ** 3

    def within(matrix: torch.Tensor) -> float:
        count = matrix.shape[0]
        return float((matrix.sum() - matrix.diagonal().sum()) / (count * (count - 1)))

    return within(kernel(x, x)) + within(kernel(y, y)) - 2.0 * float(kernel(x, y).mean())
