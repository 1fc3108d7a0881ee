"""Sample quality without the single-device image: the shapes classifier and what it measures.

  load_classifier() -> ShapeClassifier          the shipped classifier (dfjax/assets/classifier/)
  QualityJudge()(images, labels) -> Quality      class accuracy and the Fréchet classifier distance
  frechet_distance(mu1, cov1, mu2, cov2)         the closed form between two Gaussians
"""

from dfjax.eval.classifier import ShapeClassifier, classify, load_classifier
from dfjax.eval.quality import Quality, QualityJudge, frechet_distance

__all__ = ["Quality", "QualityJudge", "ShapeClassifier", "classify", "frechet_distance", "load_classifier"]
