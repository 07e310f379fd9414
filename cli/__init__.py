"""The click front end of bids-anomaly (installed as ``bids_anomaly.cli``)."""
