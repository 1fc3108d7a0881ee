"""Sample quality on the procedural dataset: class accuracy and a Fréchet classifier distance.

PSNR against `single` says how faithfully a parallel method reproduces the one-device image; it
cannot say whether the image shows what was asked for. These metrics can, for any method, using
the shipped shapes classifier (dfjax/eval/classifier.py):

* **class accuracy**: the share of generated images the classifier names with the class they
  were sampled for;
* **Fréchet classifier distance** (the FID analogue, on this classifier's penultimate features
  instead of Inception's): the Fréchet distance between Gaussians fitted to the features of the
  generated images and of fresh dataset images of the same classes,
  d² = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½).
  It is reported with its sample count, a bootstrap spread (std over resamplings of the generated
  images; the reference set is ten times larger and held fixed) and the distance the dataset itself scores at the same sample count (`dataset_floor`): with few
  samples the estimate is biased upwards, so read a distance against that floor, not against 0.

Shape letters: B images, F features, K classes, N reference images.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from dfjax import data
from dfjax.eval.classifier import ShapeClassifier, classify, load_classifier

REFERENCE_IMAGES = 2000  # dataset images the generated features are compared with
BOOTSTRAPS = 100
# Seed words of the evaluation's dataset draws; the classifier's training uses (seed, step) and
# its held-out check (2**32 − 1, seed, i), so neither is these.
_REFERENCE_SEED, _FLOOR_SEED = (2**32 - 2, 0), (2**32 - 2, 1)


# ---------------------------------------------------------------------------------- the maths

def gaussian_stats(features_bf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (F,) and covariance (F, F) of feature rows (the unbiased, N − 1, covariance)."""
  features_bf = np.asarray(features_bf, np.float64)
  if features_bf.ndim != 2 or len(features_bf) < 2:
    raise ValueError(f"need a (B, F) feature matrix with B >= 2 rows, got shape {features_bf.shape}")
  return features_bf.mean(axis=0), np.cov(features_bf, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2).

  tr((Σ₁ Σ₂)^½) is computed as Σ √λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues),
  which stays real and accurate for the singular covariances of fewer samples than features.
  """
  mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {cov1.shape}, {cov2.shape} must be "
                     "(F,) and (F, F) of one F")
  return Reference(mu2, cov2).distance(mu1, cov1)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((cov + cov.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


@dataclasses.dataclass(frozen=True)
class Reference:
  """A Gaussian to measure distances to, with its covariance's square root computed once."""

  mu: np.ndarray
  cov: np.ndarray

  @functools.cached_property
  def root(self) -> np.ndarray:
    return _psd_sqrt(self.cov)

  def distance(self, mu: np.ndarray, cov: np.ndarray) -> float:
    """Fréchet distance from N(mu, cov) to this Gaussian."""
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(self.root @ cov @ self.root), 0.0, None)).sum()
    return float(np.sum((mu - self.mu) ** 2) + np.trace(cov) + np.trace(self.cov) - 2.0 * cross)

  def distance_with_spread(self, features_bf: np.ndarray, *, bootstraps: int = BOOTSTRAPS, seed: int = 0
                           ) -> tuple[float, float]:
    """Fréchet distance of the features' Gaussian, and its std over bootstrap resamplings of the rows."""
    rng = np.random.default_rng(seed)
    resampled = [self.distance(*gaussian_stats(features_bf[rng.integers(0, len(features_bf), len(features_bf))]))
                 for _ in range(bootstraps)]
    return self.distance(*gaussian_stats(features_bf)), float(np.std(resampled)) if bootstraps else float("nan")


# ---------------------------------------------------------------------------------- the judge

@dataclasses.dataclass(frozen=True)
class Quality:
  """How a batch of class-conditional samples scores.

  Attributes:
    correct: (B,) whether the classifier named each image's class.
    accuracy: their mean.
    frechet: Fréchet classifier distance to `reference_images` dataset images of the same classes.
    frechet_std: its bootstrap std.
    dataset_floor: the distance `samples` fresh dataset images score against the same reference.
    samples, reference_images: the two sample counts.
  """

  correct: np.ndarray
  accuracy: float
  frechet: float
  frechet_std: float
  dataset_floor: float
  samples: int
  reference_images: int

  def to_json(self) -> dict:
    return {"accuracy": self.accuracy, "frechet": self.frechet, "frechet_std": self.frechet_std,
            "dataset_floor": self.dataset_floor, "samples": self.samples,
            "reference_images": self.reference_images, "correct": [bool(c) for c in self.correct]}


class QualityJudge:
  """Scores generated images against the dataset with the shipped (or a given) classifier.

  `judge(images, labels)` → Quality. The reference Gaussian is fitted once per label set.
  """

  def __init__(self, classifier: ShapeClassifier | None = None, *, reference_images: int | None = None,
               bootstraps: int | None = None):
    """Args: the classifier (None: the shipped one), the reference set's size and the bootstrap
    resamplings (None: REFERENCE_IMAGES, BOOTSTRAPS)."""
    self.classifier = load_classifier() if classifier is None else classifier
    self.reference_images = REFERENCE_IMAGES if reference_images is None else reference_images
    self.bootstraps = BOOTSTRAPS if bootstraps is None else bootstraps
    self._reference = functools.lru_cache(maxsize=4)(self._fit_reference)

  def accuracy(self, images_bhwc: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """(B,) whether each image is classified as its label (images in [-1, 1])."""
    labels_b = self._checked_labels(labels_b, len(images_bhwc))
    return classify(self.classifier, images_bhwc)[1].argmax(axis=1) == labels_b

  def __call__(self, images_bhwc: np.ndarray, labels_b: np.ndarray) -> Quality:
    """Accuracy and Fréchet distance of (B, 64, 64, 3) images in [-1, 1] sampled for `labels_b`.

    Raises:
      ValueError: fewer than 2 images, labels that do not match them, or images of another shape.
    """
    labels_b = self._checked_labels(labels_b, len(images_bhwc))
    if len(labels_b) < 2:
      raise ValueError(f"a Fréchet distance needs at least 2 images, got {len(labels_b)}")
    features_bf, logits_bk = classify(self.classifier, images_bhwc)
    reference = self._reference(tuple(labels_b.tolist()))
    frechet, spread = reference.distance_with_spread(features_bf, bootstraps=self.bootstraps)
    floor_images, _ = data.batch(_FLOOR_SEED, len(labels_b), labels=labels_b)
    floor = reference.distance(*gaussian_stats(classify(self.classifier, floor_images)[0]))
    correct_b = logits_bk.argmax(axis=1) == labels_b
    return Quality(correct_b, float(correct_b.mean()), frechet, spread, floor, len(labels_b),
                   self.reference_images)

  def _fit_reference(self, labels: tuple[int, ...]) -> Reference:
    """The Gaussian of the features of `reference_images` dataset images whose labels repeat the batch's
    (the same class mix)."""
    images, _ = data.batch(_REFERENCE_SEED, self.reference_images,
                           labels=np.resize(np.asarray(labels), self.reference_images))
    return Reference(*gaussian_stats(classify(self.classifier, images)[0]))

  def _checked_labels(self, labels_b, count: int) -> np.ndarray:
    labels_b = np.asarray(labels_b)
    num_classes = self.classifier.config.num_classes
    if labels_b.shape != (count,) or not np.issubdtype(labels_b.dtype, np.integer) or \
       (count and not 0 <= labels_b.min() <= labels_b.max() < num_classes):
      raise ValueError(f"labels must be ({count},) class ids in [0, {num_classes}), one per image; got "
                       f"shape {labels_b.shape}, dtype {labels_b.dtype}")
    return labels_b
