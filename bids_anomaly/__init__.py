"""bids-anomaly: unsupervised anomaly detection in brain MRI as a BIDS App.

Models learn what healthy brains look like from healthy participants; whatever a model
cannot reconstruct in a new scan is flagged as anomalous.
"""

import os as _os

__version__ = "0.1.0"

# Offline by design: nipype must never phone home, and OpenMP threads must not spin-wait
# (a spinning torch thread pool is ~60x slower when another process holds a core).
_os.environ.setdefault("NIPYPE_NO_ET", "1")
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("KMP_BLOCKTIME", "0")
