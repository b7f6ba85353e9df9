"""Fréchet distances between Gaussians fitted to features (FID, FVD) and the kernel distance (KID).

    stats = FeatureStats(); stats.append(features_a)  # (n, d), in batches, any number of times
    mu, sigma = stats.mean_cov(ddof=1)                  # FID: np.cov's N - 1 (pytorch-fid)
    mu, sigma = stats.mean_cov(ddof=0)                  # FVD: divided by N (StyleGAN-V)
    frechet_distance(mu_a, sigma_a, mu_b, sigma_b)       # FID, pytorch-fid's way
    frechet_distance_real(mu_a, sigma_a, mu_b, sigma_b)  # FVD, StyleGAN-V's way
    kernel_distance(features_a, features_b)             # KID (unbiased MMD, cubic polynomial kernel)

The statistics are accumulated in float64 from the raw sums (sum x, sum x x^T), so they do not
depend on how the features were batched. The two conventions differ only in the covariance's
normaliser: pytorch-fid's FID calls `np.cov` (N - 1); StyleGAN-V's FVD (and StyleGAN2-ADA's
FID) divide by N. Each metric states which it uses.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import scipy.linalg


class FeatureStats:
    """Running float64 sums of (n, d) feature batches: count, sum x, sum x x^T."""

    def __init__(self) -> None:
        self.count = 0
        self.raw_sum: Optional[np.ndarray] = None
        self.raw_outer: Optional[np.ndarray] = None

    def append(self, features) -> None:
        x = np.asarray(features, dtype=np.float32)  # as the detectors return them
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.append: features must be (n, d); got shape {x.shape}")
        if self.raw_sum is None:
            self.raw_sum = np.zeros(x.shape[1], dtype=np.float64)
            self.raw_outer = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
        elif x.shape[1] != self.raw_sum.shape[0]:
            raise ValueError(f"FeatureStats.append: {x.shape[1]} features, earlier batches had {self.raw_sum.shape[0]}")
        x64 = x.astype(np.float64)
        self.count += x.shape[0]
        self.raw_sum += x64.sum(axis=0)
        self.raw_outer += x64.T @ x64

    def mean_cov(self, ddof: int) -> Tuple[np.ndarray, np.ndarray]:
        """(mean (d,), covariance (d, d)) with the covariance divided by N - ddof."""
        if self.count <= ddof:
            raise ValueError(f"FeatureStats: {self.count} feature vectors cannot give a covariance with ddof={ddof}")
        mean = self.raw_sum / self.count
        cov = (self.raw_outer - self.count * np.outer(mean, mean)) / (self.count - ddof)
        return mean, cov


def _checked(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: means {mu1.shape} / {mu2.shape} and covariances "
                         f"{sigma1.shape} / {sigma2.shape} must match")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """FID's distance as pytorch-fid computes it: ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2)
    - 2 Tr(sqrt(sigma1 sigma2)), the square root by `scipy.linalg.sqrtm`. Where the product is
    singular (sqrtm not finite) eps is added to both diagonals first; an imaginary part above
    1e-3 on the diagonal is an error (the covariances are not valid), a smaller one is dropped."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))  # no `disp`: deprecated in SciPy 1.17
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_real(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FVD's distance as StyleGAN-V computes it: the real part of ||mu1 - mu2||^2
    + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with no regularisation and no check of the
    imaginary part (a set of fewer videos than feature dimensions gives singular covariances)."""
    mu1, sigma1, mu2, sigma2 = _checked(mu1, sigma1, mu2, sigma2)
    s = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - s * 2)))


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over
    `num_subsets` random subsets of min(n_a, n_b, max_subset_size) vectors of each set (the
    estimator of Binkowski et al. as StyleGAN2-ADA computes it), seeded."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: features must be (n, d) with the same d; got {a.shape} and {b.shape}")
    n = min(a.shape[0], b.shape[0], max_subset_size)
    if n < 2:
        raise ValueError(f"kernel_distance needs at least 2 vectors in each set; got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = a[rng.choice(a.shape[0], n, replace=False)]
        y = b[rng.choice(b.shape[0], n, replace=False)]
        kxx_kyy = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        total += (kxx_kyy.sum() - np.diag(kxx_kyy).sum()) / (n - 1) - kxy.sum() * 2 / n
    return float(total / num_subsets / n)
