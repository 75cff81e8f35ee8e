"""FID and KID against independent implementations and closed forms."""

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from deploykit.eval import frechet_distance, kernel_inception_distance
from deploykit.eval.kid import polynomial_mmd2


def _random_covariance(rng, d, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _fd_symmetric(mu1, s1, mu2, s2):
    """Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, from symmetric eigendecompositions only (no sqrtm of a product)."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w.clip(min=0))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum())


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_independent_implementations_on_unequal_covariances(d):
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.5
    s1, s2 = _random_covariance(rng, d), 3.0 * _random_covariance(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_symmetric(mu1, s1, mu2, s2), rel=1e-8)
    # torchmetrics: the trace of the square root as the sum of sqrt(eigvals(S1 S2))
    theirs = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(float(theirs), rel=1e-7)
    assert ours > 1.0  # far from the equal-statistics zero: a sign or factor error cannot pass by accident


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    # diagonal covariances: Tr sqrt(S1 S2) = sum sqrt(s1_i s2_i)
    s1, s2 = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = float((mu1 - mu2) @ (mu1 - mu2) + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # commuting covariances (a shared rotation): the distance is that of their eigenvalues
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T) == pytest.approx(expected, rel=1e-8)
    # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array(0.5), np.array(4.0), np.array(-1.0), np.array(0.25)) == pytest.approx(1.5**2 + 1.5**2)


def test_frechet_distance_of_sample_statistics():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    shift = np.full(8, 0.5)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fewer_samples_than_features_still_give_a_real_distance():
    """Rank-deficient covariances (32 samples of 128 features, as the tests' eval runs) leave rounding-size
    imaginary parts in sqrtm; they are far under the tolerance and must not raise."""
    rng = np.random.default_rng(0)
    a, b = np.maximum(rng.standard_normal((32, 128)), 0), np.maximum(rng.standard_normal((32, 128)) + 0.3, 0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.iscomplexobj(linalg.sqrtm(s1 @ s2))  # the case the tolerance exists for
    fd = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    assert fd == pytest.approx(_fd_symmetric(a.mean(0), s1, b.mean(0), s2), rel=1e-6)


def test_a_large_imaginary_part_raises_instead_of_being_dropped():
    # not a covariance: the product has a negative eigenvalue, whose square root is imaginary
    mu = np.zeros(2)
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(mu, np.eye(2), mu, np.diag([1.0, -0.5]))


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimator written out pair by pair (Bińkowski et al. 2018, eq. 2)."""
    m, d = x.shape

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_polynomial_mmd2_is_the_pairwise_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.4
    assert float(polynomial_mmd2(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(_mmd2_loops(x, y), rel=1e-10)


@pytest.mark.parametrize("subsets, subset_size", [(1, 64), (20, 16)])
def test_kid_matches_torchmetrics_on_the_same_features(subsets, subset_size):
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(64, 32, generator=gen, dtype=torch.float64).relu()
    fake = (torch.randn(80, 32, generator=gen, dtype=torch.float64) + 0.2).relu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(5)  # torchmetrics draws its subsets from the global generator; ours from a seeded one
    mean, std = metric.compute()
    ours = kernel_inception_distance(real, fake, subsets=subsets, subset_size=subset_size, seed=5)
    assert ours.mean == pytest.approx(float(mean), rel=1e-10) and ours.std == pytest.approx(float(std), rel=1e-8, abs=1e-15)
    assert ours.mean > 0.01 and ours.subset_size == subset_size


def test_kid_is_unbiased_where_fid_is_not():
    """Pairs of 32-sample sets from one distribution: KID averages to 0 (the estimator with the diagonal
    terms would average about 0.5 here), while FID, never negative, sits far above its large-sample value."""
    gen = torch.Generator().manual_seed(0)

    def draw(n):
        return torch.randn(n, 16, generator=gen, dtype=torch.float64)

    def stats(f):
        return f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False)

    kids, fids = [], []
    for _ in range(300):
        x, y = draw(32), draw(32)
        kids.append(kernel_inception_distance(x, y, subsets=1).mean)
        fids.append(frechet_distance(*stats(x), *stats(y)))
    assert abs(np.mean(kids)) < 4 * np.std(kids) / np.sqrt(len(kids))
    assert np.mean(fids) > 10 * frechet_distance(*stats(draw(4096)), *stats(draw(4096)))


def test_kid_takes_the_subset_size_the_sets_allow_and_refuses_too_few():
    real, fake = torch.randn(40, 8), torch.randn(30, 8)
    assert kernel_inception_distance(real, fake, subsets=3, subset_size=1000).subset_size == 30
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], fake, subsets=3)
    with pytest.raises(ValueError, match="same width"):
        kernel_inception_distance(real, torch.randn(30, 9))


def test_the_real_images_split_into_two_fixed_disjoint_halves():
    from deploykit.eval import split_reference

    real = torch.arange(1797, dtype=torch.float32)[:, None]  # each image is its own index
    reference, floor = split_reference(real)
    assert len(reference) == 899 and len(floor) == 898
    assert set(reference[:, 0].tolist()).isdisjoint(floor[:, 0].tolist())
    assert set(reference[:, 0].tolist()) | set(floor[:, 0].tolist()) == set(range(1797))
    again, _ = split_reference(real)
    assert torch.equal(again, reference)


def test_both_halves_hold_images_the_feature_classifier_never_saw_in_equal_share():
    """The zoo classifier holds out a random fifth of the digits; had the split reused its permutation, one
    half would hold all of them and score differently for that reason alone."""
    from deploykit.eval import split_reference
    from deploykit.zoo.data import split_indices
    from deploykit.zoo.registry import ClassifierTraining

    cfg = ClassifierTraining()
    _, held = split_indices(1797, cfg.held_out, cfg.seed)
    unseen = torch.zeros(1797, 1)
    unseen[held] = 1
    for half in split_reference(unseen):
        assert float(half.mean()) == pytest.approx(cfg.held_out, abs=0.02)
