"""The training loop shared by every learned model.

Seeded per epoch (so a resumed run repeats an uninterrupted one), early stopping on the
validation loss, a checkpoint after every epoch.

On CUDA the loop is GPU-resident: the training and validation slices are copied to the
device once, batches are gathered there, the per-epoch generator lives on the device (every
augmentation and noise draw is made there), the loss is summed on the device and read back
once per epoch, the best weights are kept on the device, autocast runs in bfloat16 (no
GradScaler; float16 with one where bfloat16 is not supported), Adam is fused, cuDNN picks
its fastest kernels and the training forward goes through ``torch.compile`` (eager again,
with a warning, if compiling fails). On the CPU each of these is what it was (the same draws,
the same float64 loss sum, deterministic algorithms), so CPU training is bit-for-bit unchanged.

A checkpoint carries the run's fingerprint (model, network, hyper-parameters, seed and a digest
of the training and validation tensors); ``resume`` refuses one whose fingerprint differs.
Deterministic algorithms are on while ``fit`` runs on the CPU, and the previous setting is
restored.

Each training batch is augmented on its device (:mod:`.augment`: flips, shifts, intensity and
gamma, bias field, small affine) with draws from the per-epoch generator.

The loss is the masked MSE of the network's output against the clean slice. A model with
another objective (a VAE's KL term) passes ``loss_fn(out, clean, mask)``; a network whose
forward returns a tuple ``(recon, *extras)`` is scored on ``recon`` when no ``loss_fn`` is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import DataError
from ..progress.display import format_duration as format_eta
from .augment import augment_batch, flip_shift
from .base import FitContext

LOG = logging.getLogger("bids_anomaly")

LossFn = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]

# Hyper-parameters that only decide when training stops: a resumed run may change them.
STOPPING_HPARAMS = ("max_minutes", "patience")
# Hyper-parameters that only decide how a trained network is used at inference (the dae's
# noisy draws): they do not identify a training run either.
INFERENCE_HPARAMS = ("infer_draws", "infer_noise", "view_combine")


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but no CUDA device is available")
    return device


def augment(x: torch.Tensor, m: torch.Tensor, shift: int, gen: torch.Generator):
    """Random left-right flips and in-plane shifts (kept for callers; see :mod:`.augment`)."""
    return flip_shift(x, m, shift, gen)


def eta_seconds(epoch_times: list[float], remaining_epochs: int, elapsed: float,
                max_minutes: float) -> float:
    """Remaining epochs × mean epoch time, capped by what is left of the time budget."""
    if not epoch_times or remaining_epochs <= 0:
        return 0.0
    est = remaining_epochs * sum(epoch_times) / len(epoch_times)
    return max(0.0, min(est, max_minutes * 60.0 - elapsed))


def masked_loss(out, clean: torch.Tensor, mask: torch.Tensor,
                loss_fn: LossFn | None = None) -> torch.Tensor:
    """``loss_fn(out, clean, mask)`` if given, else the masked MSE of ``out`` (or ``out[0]``)."""
    if loss_fn is not None:
        return loss_fn(out, clean, mask)
    if isinstance(out, tuple):
        out = out[0]
    return F.mse_loss(out.float() * mask, clean * mask)


@contextmanager
def deterministic_algorithms(warn_only: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block; the previous mode after it."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextmanager
def fast_cuda() -> Iterator[None]:
    """cuDNN's autotuned kernels and no deterministic-only algorithms for the block (GPU
    training is repeatable to a tolerance, not bit for bit); the previous settings after it."""
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.benchmark = True
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (None counts as absent)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{arr.dtype}{list(arr.shape)};".encode())
        h.update(arr.reshape(-1).view("uint8"))
    return h.hexdigest()


def run_fingerprint(net: torch.nn.Module, hparams: dict, model: str | None, seed: int,
                    train: tuple, val: tuple) -> dict:
    """What identifies a training run: a checkpoint resumes only the run it was written by."""
    hp = {k: v for k, v in hparams.items()
          if k not in STOPPING_HPARAMS + INFERENCE_HPARAMS}
    return {
        "model": model or "",
        "network": f"{type(net).__module__}.{type(net).__qualname__}",
        "parameters": {k: list(v.shape) for k, v in net.state_dict().items()},
        "hyperparameters": json.loads(json.dumps(hp, sort_keys=True, default=str)),
        "seed": int(seed),
        "training_data": tensor_digest(*train),
        "validation_data": tensor_digest(*val),
    }


# The value of an option that is off: every hyper-parameter added after a checkpoint was
# written came in off by default, so a checkpoint that lacks one trained without it.
_OFF = (0, 0.0, False, None, [], "")


def fingerprint_differences(saved: dict | None, current: dict) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, in words."""
    if saved is None:
        return ["it has no fingerprint (written by an older bids-anomaly)"]
    out = []
    for key in ("model", "network", "seed"):
        if saved.get(key) != current[key]:
            out.append(f"{key} {saved.get(key)!r} (now {current[key]!r})")
    if saved.get("parameters") != current["parameters"]:
        out.append("network layers or their shapes")
    old, new = saved.get("hyperparameters") or {}, current["hyperparameters"]
    for k in sorted(set(old) | set(new)):
        if k not in old and new[k] in _OFF:
            continue  # added since, and off: the saved run trained without it too
        if old.get(k) != new.get(k):
            out.append(f"hyper-parameter {k} {old.get(k)!r} (now {new.get(k)!r})")
    for key in ("training_data", "validation_data"):
        if saved.get(key) != current[key]:
            out.append(key.replace("_", " ") + " (another data split or preprocessing)")
    return out


class CompiledForward:
    """``net``'s forward through ``torch.compile`` when ``enabled``; at the first failure
    (no Triton, no compiler, an unsupported operation) a warning and eager calls from then on.

    The module itself is never wrapped, so its ``state_dict`` keys stay those of ``net``."""

    def __init__(self, net: torch.nn.Module, enabled: bool):
        self.net = net
        self.fn: Callable | None = None
        if enabled:
            try:
                self.fn = torch.compile(net)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                LOG.warning("torch.compile unavailable (%s); training without it", exc)

    @property
    def compiled(self) -> bool:
        return self.fn is not None

    def __call__(self, inp):
        if self.fn is not None:
            try:
                return self.fn(inp)
            except Exception as exc:  # noqa: BLE001 - compile errors surface at first call
                LOG.warning("torch.compile failed (%s: %s); training without it",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.fn = None
        return self.net(inp)


class TorchTrainer:
    """Fits ``net`` to map ``make_input(clean)`` back to ``clean`` (masked MSE or ``loss_fn``)."""

    def __init__(self, net: torch.nn.Module, hparams: dict, ctx: FitContext,
                 model: str | None = None):
        self.net = net
        self.hp = hparams
        self.ctx = ctx
        self.model = model  # the model type, for the checkpoint's fingerprint

    def _save(self, state: dict) -> None:
        if not self.ctx.checkpoint:
            return
        path = Path(self.ctx.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def fit(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        xv: torch.Tensor | None,
        mv: torch.Tensor | None,
        make_input: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
        loss_fn: LossFn | None = None,
    ) -> dict:
        """Train (or resume ``ctx.checkpoint``); the best epoch's weights end up in ``net``."""
        if resolve_device(self.ctx.device).startswith("cuda"):
            with fast_cuda():
                return self._fit(x, m, xv, mv, make_input, loss_fn)
        with deterministic_algorithms():
            return self._fit(x, m, xv, mv, make_input, loss_fn)

    def _load_checkpoint(self, device: str, fingerprint: dict) -> dict:
        """The checkpoint's state; DataError if it cannot be read or is from another run."""
        path = self.ctx.checkpoint
        advice = "drop --resume to train from scratch, or delete the checkpoint"
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise DataError(f"cannot resume from checkpoint {path}: unreadable ({exc}); "
                            f"{advice}") from exc
        saved = state.get("fingerprint") if isinstance(state, dict) else None
        diffs = fingerprint_differences(saved, fingerprint)
        if diffs:
            raise DataError(f"cannot resume from checkpoint {path}: it is from another training "
                            f"run; differs in: {'; '.join(diffs)}; {advice}")
        return state

    def _fit(self, x: torch.Tensor, m: torch.Tensor, xv: torch.Tensor | None,
             mv: torch.Tensor | None, make_input: Callable, loss_fn: LossFn | None) -> dict:
        ctx, hp = self.ctx, self.hp
        device = resolve_device(ctx.device)
        cuda = device.startswith("cuda")
        if not cuda:
            torch.set_num_threads(max(1, ctx.threads))
        torch.manual_seed(ctx.seed)
        fingerprint = (run_fingerprint(self.net, hp, self.model, ctx.seed, (x, m), (xv, mv))
                       if ctx.checkpoint else None)
        net = self.net.to(device)
        forward = CompiledForward(net, cuda and ctx.compile)
        opt = torch.optim.Adam(net.parameters(), lr=hp["lr"], fused=cuda or None)
        epochs = int(hp["epochs"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        amp_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported()
                     else torch.float16)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        if cuda:  # resident on the device: no host copy per batch
            x, m = x.to(device), m.to(device)
            if xv is not None:
                xv, mv = xv.to(device), mv.to(device)
        history: list[dict] = []
        best = (math.inf, None, -1)
        start_epoch = 0
        if ctx.resume and ctx.checkpoint and Path(ctx.checkpoint).exists():
            state = self._load_checkpoint(device, fingerprint)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            history = state["history"]
            best = (state["best_loss"], state["best_net"], state["best_epoch"])
            start_epoch = state["epoch"] + 1
            LOG.info("Resuming training from epoch %d (%s)", start_epoch + 1, ctx.checkpoint)
        bs = int(hp["batch_size"])
        t0 = time.perf_counter()
        epoch_times: list[float] = []
        for epoch in range(start_epoch, epochs):
            te = time.perf_counter()
            gen = torch.Generator(device=device if cuda else "cpu")
            gen.manual_seed(ctx.seed * 100003 + epoch)
            # The global RNG too (VAE sampling, dropout): a resumed run must not depend on it.
            torch.manual_seed(ctx.seed * 100003 + epoch + (1 << 31))
            net.train()
            order = torch.randperm(len(x), generator=gen, device=gen.device)
            # float64 on the device: read back once per epoch, the same sum as Python floats.
            total = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                xb, mb = x[idx], m[idx]
                xb, mb = augment_batch(xb, mb, hp, gen)
                inp = make_input(xb, mb, gen)
                with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=cuda):
                    out = forward(inp)
                    loss = masked_loss(out, xb, mb, loss_fn)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += loss.detach().double() * len(idx)
                seen += len(idx)
            sched.step()
            train_loss = float(total) / max(1, seen)
            val_loss = (self.validate(xv, mv, make_input, device, loss_fn) if xv is not None
                        else train_loss)
            dt = time.perf_counter() - te
            rec = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "seconds": dt, "samples_per_s": seen / dt if dt > 0 else 0.0}
            history.append(rec)
            epoch_times.append(dt)
            eta = eta_seconds(epoch_times, epochs - epoch - 1, time.perf_counter() - t0,
                              float(hp["max_minutes"]))
            rec_progress = {**rec, "epochs": epochs, "eta_seconds": eta}
            if val_loss < best[0]:  # kept where the network is (no copy to the host on CUDA)
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best = (val_loss, best_state, epoch + 1)
            self._save({"net": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "history": history, "epoch": epoch,
                        "best_loss": best[0], "best_net": best[1], "best_epoch": best[2],
                        "fingerprint": fingerprint})
            if ctx.progress:
                ctx.progress(rec_progress)
            LOG.info("epoch %d/%d train %.5f val %.5f (%.1f s, %.0f slices/s, ETA %s)",
                     epoch + 1, epochs, train_loss, val_loss, dt, rec["samples_per_s"],
                     format_eta(eta))
            if epoch + 1 - best[2] >= int(hp["patience"]):
                LOG.info("Early stopping: no validation improvement for %d epochs", hp["patience"])
                break
            if (time.perf_counter() - t0) / 60.0 > float(hp["max_minutes"]):
                LOG.info("Stopping: time budget of %.1f min reached", hp["max_minutes"])
                break
        if best[1] is not None:
            net.load_state_dict(best[1])
        net.cpu().eval()
        return {"history": history, "best_epoch": best[2], "best_val_loss": best[0],
                "device": device, "compiled": forward.compiled}

    @torch.no_grad()
    def validate(self, xv, mv, make_input, device, loss_fn: LossFn | None = None) -> float:
        """Mean loss over the validation slices (float32 on every device), read back once."""
        self.net.eval()
        cuda = str(device).startswith("cuda")
        gen = torch.Generator(device=device if cuda else "cpu").manual_seed(self.ctx.seed + 7)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(xv), 64):
            xb, mb = xv[i : i + 64].to(device), mv[i : i + 64].to(device)
            out = self.net(make_input(xb, mb, gen))
            total += masked_loss(out, xb, mb, loss_fn).double() * len(xb)
        return float(total) / max(1, len(xv))
