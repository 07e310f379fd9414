"""Calibration: the residual → statmap math, its types, out-of-fold thresholds."""
