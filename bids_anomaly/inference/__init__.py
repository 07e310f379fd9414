"""Inference: one scan scored against a bundle (statmap, scores, clusters, percentile)."""
