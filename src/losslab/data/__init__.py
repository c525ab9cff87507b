"""losslab.data."""
