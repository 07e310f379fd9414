"""Random streams, smooth random fields and rotations for the synthetic anatomy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Random streams and smooth fields


def stream(entropy: Sequence[int], *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy), spawn_key=key))


def _rbf_basis(n: int, n_ctrl: int, width: float) -> np.ndarray:
    """(n, n_ctrl) Gaussian bumps evenly spread over ``n`` samples, ``width`` in samples."""
    x = np.arange(n, dtype=np.float64)[:, None]
    centres = np.linspace(0.0, n - 1.0, n_ctrl)[None, :]
    return np.exp(-0.5 * ((x - centres) / width) ** 2)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int, amplitude: float
) -> np.ndarray:
    """A smooth random field on ``shape`` with max |value| == ``amplitude`` (separable RBF)."""
    coef = rng.standard_normal((n_ctrl,) * 3)
    bases = [_rbf_basis(n, n_ctrl, max(n / n_ctrl, 1.0)) for n in shape]
    out = np.einsum("abc,ia,jb,kc->ijk", coef, *bases, optimize=True)
    peak = np.abs(out).max()
    return (out * (amplitude / peak if peak > 0 else 0.0)).astype(np.float32)


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def euler(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def wave_field(waves: np.ndarray, pts: Sequence[np.ndarray], amplitude: float) -> np.ndarray:
    """Sum of plane waves at ``pts`` (three coordinate arrays); |value| is about ``amplitude``."""
    out = np.zeros(pts[0].shape, np.float32)
    for dx, dy, dz, freq, phase in waves:
        out += np.cos(freq * (dx * pts[0] + dy * pts[1] + dz * pts[2]) + phase)
    return out * np.float32(amplitude / len(waves) * 2.0)
