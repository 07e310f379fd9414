"""Synthetic BIDS cohorts: configuration, random fields, anatomy and lesions, writing."""
