"""losslab.models."""
