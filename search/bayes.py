"""Bayesian optimization's two pieces: a Gaussian process and expected improvement.

An accuracy evaluation (prune, fine-tune, validate) costs seconds to minutes; a plan's
features cost nothing. So the search fits a GP to the plans it has evaluated and spends
the next evaluation on the proposal with the largest *expected improvement* over the best
reward so far (Jones et al., 1998)::

    gp = GaussianProcess().fit(features_seen, rewards_seen)
    mean, std = gp.predict(features_of_proposals)
    pick = int(np.argmax(expected_improvement(mean - penalties, std, best_reward)))

Pure numpy: a Matern-5/2 kernel with one length scale, chosen by the marginal likelihood
over a small grid (a handful of evaluations cannot support more hyper-parameters), and
targets standardized so the same grid fits any reward scale.
"""

from __future__ import annotations

import math

import numpy as np

LENGTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Candidate length scales, in units of the features' RMS distance between plans."""


def matern52(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    """Matern-5/2 covariance between the rows of ``a`` and ``b`` (unit variance)."""
    dist = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)) / length
    root5 = math.sqrt(5.0) * dist
    return (1.0 + root5 + root5 ** 2 / 3.0) * np.exp(-root5)


class GaussianProcess:
    """A GP regressor with a Matern-5/2 kernel; ``noise`` is the observation variance
    relative to the standardized targets (fine-tuning is not deterministic)."""

    def __init__(self, noise: float = 1e-2):
        self.noise = noise
        self.length = 1.0
        self._x = np.zeros((0, 0))
        self._alpha = np.zeros(0)
        self._chol = np.zeros((0, 0))
        self._mean = 0.0
        self._scale = 1.0

    def fit(self, x: np.ndarray, y: np.ndarray) -> "GaussianProcess":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._mean = float(y.mean()) if len(y) else 0.0
        self._scale = float(y.std()) or 1.0
        target = (y - self._mean) / self._scale
        spread = _rms_distance(x)
        best = None
        for length in LENGTH_SCALES:
            fitted = self._factor(x, target, length * spread)
            if fitted and (best is None or fitted[0] > best[0]):
                best = (*fitted, length * spread)
        if best is None:  # never singular with noise > 0, but stay safe
            raise np.linalg.LinAlgError("the GP kernel matrix is singular")
        _, self._chol, self._alpha, self.length = best
        self._x = x
        return self

    def _factor(self, x, target, length):
        gram = matern52(x, x, length) + self.noise * np.eye(len(x))
        try:
            chol = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            return None
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, target))
        log_likelihood = (-0.5 * target @ alpha - np.log(np.diag(chol)).sum()
                          - 0.5 * len(x) * math.log(2 * math.pi))
        return log_likelihood, chol, alpha

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation at the rows of ``x`` (target units)."""
        x = np.asarray(x, dtype=np.float64)
        if len(self._x) == 0:
            return np.full(len(x), self._mean), np.full(len(x), self._scale)
        cross = matern52(x, self._x, self.length)
        mean = cross @ self._alpha
        solved = np.linalg.solve(self._chol, cross.T)
        var = np.maximum(1.0 - (solved ** 2).sum(0), 1e-12)
        return mean * self._scale + self._mean, np.sqrt(var) * self._scale


def _rms_distance(x: np.ndarray) -> float:
    if len(x) < 2:
        return 1.0
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    pairs = sq[np.triu_indices(len(x), 1)]
    return float(math.sqrt(pairs.mean())) or 1.0


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float,
                         xi: float = 0.0) -> np.ndarray:
    """E[max(f - best - xi, 0)] for f ~ N(mean, std^2), elementwise (maximization)."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    gain = mean - best - xi
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, gain / std, 0.0)
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2.0 * math.pi)
    return np.where(std > 0, gain * cdf + std * pdf, np.maximum(gain, 0.0))


_erf = np.vectorize(math.erf, otypes=[np.float64])
