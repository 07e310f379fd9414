"""Training: folds, out-of-fold calibration, the final model and its bundle; re-calibration."""
