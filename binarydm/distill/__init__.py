"""Low-rank Representation Mimicking (LRM): feature hooks, PCA projections, the loss.

Imports torch only (never ray, mlflow, optuna). ``LowRankMimicking`` is the
training loop's entry point; the pieces are public for tests and analysis.
"""

from binarydm.distill.hooks import (
    FeatureRecorder,
    block_output,
    feature_blocks,
    feature_points,
    feature_units,
    unwrap_unet,
)
from binarydm.distill.lrm import LowRankMimicking, LRMLoss, LRMTerms
from binarydm.distill.projection import LowRankProjection, feature_dim, lrm_rank, pca_basis

__all__ = [
    "FeatureRecorder",
    "LRMLoss",
    "LRMTerms",
    "LowRankMimicking",
    "LowRankProjection",
    "block_output",
    "feature_blocks",
    "feature_dim",
    "feature_points",
    "feature_units",
    "lrm_rank",
    "pca_basis",
    "unwrap_unet",
]
