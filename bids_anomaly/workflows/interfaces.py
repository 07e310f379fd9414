"""Thin nipype interfaces over the library's plain functions."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..progress.records import node_progress


class _PreprocessInput(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True, desc="T1w image")
    extra = traits.Dict(traits.Str, File(exists=True), desc="other contrasts: name → image")
    config = traits.Dict(mandatory=True, desc="PreprocConfig.to_dict()")
    # Not hashed: the outputs do not depend on it (ANTs and N4 run on one thread), so a scan
    # preprocessed in a batch is reused when it is later run alone, and the other way round.
    threads = traits.Int(1, usedefault=True, nohash=True)
    seed = traits.Int(0, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc="deepbet on the GPU: tells nipype's GPU queue")
    # Left undefined for the default (SimpleITK): an undefined input is not hashed, so work
    # directories of earlier runs stay valid; set, it re-runs the node (bias.py).
    n4_backend = traits.Enum("simpleitk", "antspyx", desc="N4 implementation (bias.py)")


class _PreprocessOutput(TraitedSpec):
    result = File(exists=True, desc="preproc.json describing the outputs")


class Preprocess(SimpleInterface):
    """Wraps :func:`bids_anomaly.preprocessing.pipeline.preprocess_scan`."""

    input_spec = _PreprocessInput
    output_spec = _PreprocessOutput

    def _run_interface(self, runtime):
        from ..core.config import PreprocConfig
        from ..preprocessing.pipeline import preprocess_scan

        files = {"T1w": self.inputs.t1w, **dict(self.inputs.extra)}
        with node_progress(runtime.cwd):
            preprocess_scan(files, Path(runtime.cwd),
                            PreprocConfig.from_dict(self.inputs.config),
                            threads=self.inputs.threads, seed=self.inputs.seed,
                            device=self.inputs.device,
                            n4_backend=(self.inputs.n4_backend
                                        if isdefined(self.inputs.n4_backend) else "simpleitk"))
        self._results["result"] = os.path.join(runtime.cwd, "preproc.json")
        return runtime


class _ScoreInput(BaseInterfaceInputSpec):
    preproc = File(exists=True, mandatory=True)
    bundle = traits.Directory(exists=True, mandatory=True)
    bundle_sha256 = traits.Str(desc="model.json checksum, so a new bundle re-scores")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True, nohash=True)  # as Preprocess's
    use_gpu = traits.Bool(False, usedefault=True, desc="tells nipype's GPU queue")


class _ScoreOutput(TraitedSpec):
    files = traits.Dict(desc="files written by score_preprocessed")


class Score(SimpleInterface):
    """Wraps :func:`bids_anomaly.inference.score_scan.score_preprocessed`."""

    input_spec = _ScoreInput
    output_spec = _ScoreOutput

    def _run_interface(self, runtime):
        from ..inference.score_scan import score_preprocessed

        with node_progress(runtime.cwd):
            self._results["files"] = score_preprocessed(
                self.inputs.preproc, self.inputs.bundle, Path(runtime.cwd),
                device=self.inputs.device, threads=self.inputs.threads)
        return runtime


class _SinkInput(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    key = traits.Dict(mandatory=True, desc="ScanKey fields")
    files = traits.Dict(mandatory=True)
    preproc = File(exists=True, mandatory=True)
    sources = traits.Dict(mandatory=True)
    provenance = traits.Dict()
    resolution = traits.Int(2, usedefault=True)


class _SinkOutput(TraitedSpec):
    record = traits.Dict()


class DerivativesSink(SimpleInterface):
    """Wraps :func:`bids_anomaly.bids_io.derivatives.sink_scan`."""

    input_spec = _SinkInput
    output_spec = _SinkOutput

    def _run_interface(self, runtime):
        from ..bids_io.derivatives import sink_scan
        from ..core.naming import ScanKey
        from ..reports.thumbnails import write_thumbnail

        pre = json.loads(Path(self.inputs.preproc).read_text())
        key = ScanKey(**self.inputs.key)
        with node_progress(runtime.cwd):
            self._results["record"] = sink_scan(
                Path(self.inputs.output_dir), key, dict(self.inputs.files), pre,
                Path(self.inputs.bids_dir), dict(self.inputs.sources),
                dict(self.inputs.provenance), self.inputs.resolution)
            # The group report's overview strip (a failure here never fails the scan).
            write_thumbnail(Path(self.inputs.output_dir), key, self.inputs.resolution)
        return runtime


class _FitInput(BaseInterfaceInputSpec):
    preproc = traits.List(File(exists=True), mandatory=True)
    spec = traits.Dict(mandatory=True, desc="FitInputs fields except preproc_jsons")
    dest = traits.Str(mandatory=True, desc="bundle directory to write")
    use_gpu = traits.Bool(False, usedefault=True, desc="tells nipype's GPU queue")


class _FitOutput(TraitedSpec):
    bundle = traits.Directory(exists=True)


class Fit(SimpleInterface):
    """Wraps :func:`bids_anomaly.training.fit.fit_bundle`."""

    input_spec = _FitInput
    output_spec = _FitOutput

    def _run_interface(self, runtime):
        from ..training.fit import FitInputs, fit_bundle

        inputs = FitInputs(preproc_jsons=list(self.inputs.preproc), **self.inputs.spec)
        with node_progress(runtime.cwd) as progress:  # epochs for the main process's bar
            self._results["bundle"] = str(fit_bundle(inputs, Path(self.inputs.dest),
                                                     progress=progress.epoch))
        return runtime


class _RecalibrateInput(BaseInterfaceInputSpec):
    bundle = traits.Directory(exists=True, mandatory=True, desc="the bundle to re-reference")
    preproc = traits.List(File(exists=True), mandatory=True, desc="the controls' preproc.json")
    scans = traits.List(traits.Dict, mandatory=True, desc="participant, scan_id, sha256 each")
    dataset = traits.Str(mandatory=True)
    dest = traits.Str(mandatory=True, desc="bundle directory to write")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="tells nipype's GPU queue")


class Recalibrate(SimpleInterface):
    """Wraps :func:`bids_anomaly.training.recalibrate.recalibrate_bundle`."""

    input_spec = _RecalibrateInput
    output_spec = _FitOutput

    def _run_interface(self, runtime):
        import torch

        from ..models.bundle import load_bundle
        from ..training.recalibrate import ReferenceScan, recalibrate_bundle

        torch.set_num_threads(max(1, self.inputs.threads))
        scans = [ReferenceScan(js, **meta) for js, meta in zip(self.inputs.preproc,
                                                                self.inputs.scans)]
        with node_progress(runtime.cwd):
            self._results["bundle"] = str(recalibrate_bundle(
                load_bundle(Path(self.inputs.bundle)), scans, Path(self.inputs.dest),
                dataset=self.inputs.dataset, device=self.inputs.device))
        return runtime
