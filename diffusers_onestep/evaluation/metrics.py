"""Sample-quality metrics computed from classifier features and predictions.

Every function takes plain tensors (or anything `torch.as_tensor` accepts) and returns Python floats, so the same code
scores the digits benchmark, the training scripts' validation and the benchmarks. Feature extraction is not done here:
pass the features of whichever network defines the metric (the digits judge's penultimate layer, Inception, ...).

- Fréchet distance / FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017 (arXiv 1706.08500); the Fréchet distance between Gaussians is from Dowson & Landau,
  "The Fréchet distance between multivariate normal distributions", J. Multivariate Anal. 1982.
- Precision / recall: Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models",
  NeurIPS 2019 (arXiv 1904.06991).
- Removal rate: SNOOPI (Nguyen et al., arXiv 2412.02687), section on negative prompts: the share of images generated
  with a negative prompt that do not show the negated concept.
"""

from __future__ import annotations

import torch


__all__ = [
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "precision_recall",
    "prompt_accuracy",
    "removal_rate",
]


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Mean and unbiased covariance of a set of feature vectors, in float64.

    Args:
        features (`torch.Tensor` or array of shape `(N, D)`): one feature vector per sample, `N >= 2`.

    Returns:
        `(mu, sigma)` of shapes `(D,)` and `(D, D)`.
    """
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must have shape (N, D) with N >= 2, got {tuple(features.shape)}.")
    mu = features.mean(dim=0)
    centered = features - mu
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""
    Fréchet (2-Wasserstein squared) distance between the Gaussians `N(mu1, sigma1)` and `N(mu2, sigma2)` (Dowson &
    Landau 1982), as used by FID (Heusel et al. 2017):

    `d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})`.

    The trace term is computed in float64 without scipy: `tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2})`, and the
    inner matrix is symmetric positive semi-definite, so both square roots come from `torch.linalg.eigh` (tiny negative
    eigenvalues from round-off are clamped to zero).

    Args:
        mu1, mu2 (`torch.Tensor` of shape `(D,)`): the means.
        sigma1, sigma2 (`torch.Tensor` of shape `(D, D)`): the covariances (symmetric positive semi-definite).

    Returns:
        `float`: the distance, clamped at 0.
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(x) for x in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(
            f"`mu1` and `mu2` must be vectors of equal shape, got {tuple(mu1.shape)}, {tuple(mu2.shape)}."
        )
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"`{name}` must have shape ({dim}, {dim}), got {tuple(sigma.shape)}.")
    sqrt_sigma1 = _sqrtm_psd(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = torch.linalg.eigvalsh(0.5 * (product + product.T)).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


def fid_from_features(features_a, features_b) -> float:
    r"""
    Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017, when the features are
    Inception pool features; "digits-FID" with the digits judge's features).

    Args:
        features_a (`torch.Tensor` of shape `(N, D)`): e.g. features of generated images.
        features_b (`torch.Tensor` of shape `(M, D)`): e.g. features of real images.

    Returns:
        `float`: the distance (0 for identical sets, up to round-off; invariant to the order of the samples).
    """
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def _as_predictions(logits_or_preds) -> torch.Tensor:
    values = torch.as_tensor(logits_or_preds).detach().cpu()
    if values.ndim == 2:
        return values.argmax(dim=1)
    if values.ndim != 1:
        raise ValueError(f"expected class predictions `(N,)` or logits `(N, num_classes)`, got {tuple(values.shape)}.")
    return values.long()


def prompt_accuracy(logits_or_preds, labels) -> float:
    r"""
    Share of images that a classifier assigns to the class they were prompted with ("prompt accuracy", the
    classification-accuracy score of conditional generators).

    Args:
        logits_or_preds (`torch.Tensor`): class predictions `(N,)` or logits `(N, num_classes)` (argmax is taken).
        labels (`torch.Tensor` of shape `(N,)`): the prompted class of each image.

    Returns:
        `float` in `[0, 1]`.
    """
    preds = _as_predictions(logits_or_preds)
    labels = torch.as_tensor(labels).detach().cpu().long()
    if preds.shape != labels.shape or preds.numel() == 0:
        raise ValueError(f"predictions {tuple(preds.shape)} and `labels` {tuple(labels.shape)} must match, N > 0.")
    return float((preds == labels).double().mean())


def removal_rate(logits_or_preds, negated_labels) -> float:
    r"""
    Negative-prompt removal rate (SNOOPI, arXiv 2412.02687): the share of images generated with a negative prompt that
    the classifier does **not** assign to the negated class. 1 means the negated concept never appears.

    Args:
        logits_or_preds (`torch.Tensor`): class predictions `(N,)` or logits `(N, num_classes)`.
        negated_labels (`torch.Tensor` of shape `(N,)`): the class named in each image's negative prompt.

    Returns:
        `float` in `[0, 1]`.
    """
    preds = _as_predictions(logits_or_preds)
    negated_labels = torch.as_tensor(negated_labels).detach().cpu().long()
    if preds.shape != negated_labels.shape or preds.numel() == 0:
        raise ValueError(
            f"predictions {tuple(preds.shape)} and `negated_labels` {tuple(negated_labels.shape)} must match, N > 0."
        )
    return float((preds != negated_labels).double().mean())


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(chunk, b) for chunk in a.split(chunk_size)])


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    distances = _pairwise_distances(features, features)
    # column 0 of the sorted distances is the point itself (distance 0), so the k-th neighbour is column k
    return distances.kthvalue(k + 1, dim=1).values


def _manifold_coverage(support: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of `queries` inside at least one ball `B(support_i, radii_i)`."""
    inside = _pairwise_distances(queries, support) <= radii.unsqueeze(0)
    return float(inside.any(dim=1).double().mean())


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    r"""
    Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991). Each set's manifold is the union of
    balls centred at its points with radius the distance to the point's `k`-th nearest neighbour within the set;
    precision is the share of fake samples inside the real manifold, recall the share of real samples inside the fake
    manifold. Distances are Euclidean, in float64.

    Args:
        real_features (`torch.Tensor` of shape `(N, D)`): features of real images, `N > k`.
        fake_features (`torch.Tensor` of shape `(M, D)`): features of generated images, `M > k`.
        k (`int`, defaults to 3): the neighbourhood size (the paper uses 3).

    Returns:
        `(precision, recall)`, floats in `[0, 1]`.
    """
    real, fake = _as_float64(real_features), _as_float64(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"`k` must be >= 1 and smaller than both set sizes, got k={k}.")
    precision = _manifold_coverage(real, _knn_radii(real, k), fake)
    recall = _manifold_coverage(fake, _knn_radii(fake, k), real)
    return precision, recall
