"""losslab: loss-function research on imbalanced medical image classification, tracked in MLflow."""

__version__ = "0.1.0"
