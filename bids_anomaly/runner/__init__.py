"""Run drivers: the train, calibrate, participant and group levels, and the demo."""
