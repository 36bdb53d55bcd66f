import math

import pytest
import torch

from diffusers_onestep.evaluation import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    precision_recall,
    prompt_accuracy,
    removal_rate,
)


def _random_features(n: int = 500, dim: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + 3.0


def test_fid_of_a_set_with_itself_is_zero():
    features = _random_features()
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_fid_is_invariant_to_sample_order():
    a, b = _random_features(seed=0), _random_features(seed=1)
    permutation = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(0))
    assert fid_from_features(a[permutation], b) == pytest.approx(fid_from_features(a, b), rel=1e-10)
    assert fid_from_features(b, a) == pytest.approx(fid_from_features(a, b), rel=1e-8)


def test_frechet_distance_one_dimensional_closed_form():
    # N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1)) == pytest.approx(2.0)


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2 = 5 + (4 + 1 + 0)
    expected = 5.0 + 5.0
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    mu1, sigma1 = feature_statistics(_random_features(seed=2))
    mu2, sigma2 = feature_statistics(_random_features(seed=3) * 0.5)
    covmean = linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real
    expected = float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * covmean.trace())
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_fid_from_features_recovers_gaussian_distance():
    # large samples of N(0, I) and N(m, 4 I) in 4-D: FID -> |m|^2 + 4 * (2 - 1)^2
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 4, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(200_000, 4, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert fid_from_features(a, b) == pytest.approx(2.0 + 4.0, rel=0.02)


def test_frechet_distance_validates_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="features"):
        fid_from_features(torch.zeros(1, 3), torch.zeros(5, 3))


def _on_a_line(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs])


def test_precision_recall_identical_sets():
    features = _random_features(n=200)
    assert precision_recall(features, features, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets():
    real = _random_features(n=100, seed=0)
    assert precision_recall(real, real + 1e6, k=3) == (0.0, 0.0)


def test_precision_recall_hand_counted():
    real = _on_a_line(0.0, 1.0, 2.0, 3.0)  # k = 1 radii: 1, 1, 1, 1
    fake = _on_a_line(0.3, 0.5, 5.0, 3.9)  # k = 1 radii: 0.2, 0.2, 1.1, 1.1
    # fake inside real balls: 0.3, 0.5, 3.9 (not 5.0, 2 away from 3) -> 3/4
    # real inside fake balls: only 3 (0.9 from 3.9 <= 1.1) -> 1/4
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.75)
    assert recall == pytest.approx(0.25)


def test_precision_recall_rejects_k_too_large():
    with pytest.raises(ValueError, match="k"):
        precision_recall(_on_a_line(0, 1, 2), _on_a_line(0, 1, 2), k=3)


def test_prompt_accuracy_from_predictions_and_logits():
    labels = torch.tensor([0, 1, 2, 3])
    assert prompt_accuracy(torch.tensor([0, 1, 0, 3]), labels) == pytest.approx(0.75)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 1]), num_classes=4).float()
    assert prompt_accuracy(logits, labels) == pytest.approx(0.5)


def test_removal_rate():
    negated = torch.tensor([7, 7, 7, 7, 3])
    assert removal_rate(torch.tensor([7, 1, 2, 7, 3]), negated) == pytest.approx(2 / 5)
    assert removal_rate(torch.tensor([1, 1, 1, 1, 1]), negated) == 1.0


def test_accuracy_validates_shapes():
    with pytest.raises(ValueError, match="labels"):
        prompt_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert math.isclose(prompt_accuracy([1], [1]), 1.0)
