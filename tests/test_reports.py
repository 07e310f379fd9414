"""Participant and group HTML reports built from a hand-made OUTPUT_DIR."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_anomaly.core.mosaic import mosaic
from bids_anomaly.core.naming import ScanKey, ScanOutputs
from bids_anomaly.core.templates import load_template
from bids_anomaly.reports import build_group_report, build_participant_report, figures
from bids_anomaly.reports.html import esc, json_script, safe_relative_href

PNG = b"\x89PNG\r\n\x1a\n"
ERROR_MSG = 'Registration failed: <script>alert("x")</script> & cost > 1e9'
GROUP_COLUMNS = ["participant_id", "session_id", "run", "scan_id", "model", "score", "percentile",
                 "flagged", "status", "error", "n_clusters", "anomaly_volume_mm3", "report"]
EXTERNAL = re.compile(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
URL_IN_CSS = re.compile(r"url\(\s*['\"]?\s*(?:https?:)?//", re.I)


def _save(tpl, path: Path, data: np.ndarray, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(tpl.image(data, dtype=dtype), str(path))


def _scores(key: ScanKey, **kw) -> dict:
    rec = {
        "scan_id": key.scan_id,
        "participant_id": f"sub-{key.subject}",
        "session_id": f"ses-{key.session}" if key.session else None,
        "run": None,
        "status": "ok",
        "default_fpr": 0.001,
        "threshold": 2.5,
        "healthy_scores": [float(v) for v in np.linspace(0.4, 1.6, 30)],
        "model": {"name": "dae-ixi", "type": "dae", "sha256": "ab" * 32,
                  "card": {"training_dataset": "IXI", "n_participants": 120,
                           "contrasts": ["T1w"], "version": "1.0"}},
        "provenance": {"command": "bids-anomaly /data /out participant",
                       "date": "2024-05-01T12:00:00", "versions": {"bids-anomaly": "0.1.0",
                                                                    "torch": "2.13.0"}},
        "qc": {},
    }
    rec.update(kw)
    return rec


def _write_scan(out: Path, tpl, key: ScanKey, lesion: bool, rng, **scores) -> None:
    so = ScanOutputs(key)
    t1 = np.asarray(tpl.t1, dtype=np.float32)
    brain = tpl.mask
    pre = t1.copy()
    stat = (rng.normal(0, 1, tpl.shape).astype(np.float32)) * brain
    les = np.zeros(tpl.shape, bool)
    if lesion:
        ii, jj, kk = np.ogrid[: tpl.shape[0], : tpl.shape[1], : tpl.shape[2]]
        les = ((ii - 62) ** 2 + (jj - 70) ** 2 + (kk - 55) ** 2) < 25
        pre[les] *= 1.7
        stat[les] += 6.0
    _save(tpl, out / so.preproc("T1w"), pre)
    _save(tpl, out / so.recon("T1w"), t1)
    _save(tpl, out / so.template_brain_mask, brain, np.uint8)
    _save(tpl, out / so.template_statmap, stat)
    _save(tpl, out / so.template_mask, les & (stat > 3.0), np.uint8)
    rows = ["cluster_id\tsize_mm3\tpeak_z\tmean_z\tcentroid_x\tcentroid_y\tcentroid_z\themisphere"]
    if lesion:
        rows.append("1\t1256.0\t7.5312\t5.91\t26.0\t6.5\t38.0\tright")
        rows.append("2\t48\t3.42\t3.2\t-24.5\t-40\t12\tleft")
    (out / so.clusters).write_text("\n".join(rows) + "\n")
    rec = _scores(key, n_clusters=2 if lesion else 0,
                  anomaly_volume_mm3=1304.0 if lesion else 0.0, **scores)
    (out / so.scores).write_text(json.dumps(rec))


NATIVE_SHAPE = (60, 72, 36)  # LPS voxel axes, 1 x 1 x 2 mm: the report must reorient and resample


def _write_native(raw: Path, out: Path, key: ScanKey) -> tuple[np.ndarray, np.ndarray]:
    """A raw T1w (head with a bright skull ring) and its native brain-mask derivative."""
    ii, jj, kk = np.meshgrid(*(np.arange(n) - n / 2 + 0.5 for n in NATIVE_SHAPE), indexing="ij")
    r = np.sqrt((ii / 26) ** 2 + (jj / 32) ** 2 + (kk / 15) ** 2)
    brain = r < 0.8
    head = np.where(brain, 100.0 + 20 * np.cos(ii / 3), np.where(r < 0.95, 250.0, 0.0))
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [30.0, 36.0, -36.0]
    rel = key.subdir / f"{key.scan_id}_T1w.nii.gz"
    (raw / rel).parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(head.astype(np.float32), affine), str(raw / rel))
    so = ScanOutputs(key)
    nb.save(nb.Nifti1Image(brain.astype(np.uint8), affine), str(out / so.native_brain_mask))
    (out / so.native_brain_mask).with_name(
        so.native_brain_mask.name.replace(".nii.gz", ".json")).write_text(
        json.dumps({"Sources": [f"bids:raw:{rel.as_posix()}"], "Type": "Brain"}))
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "DatasetType": "derivative", "DatasetLinks": {"raw": raw.as_uri()}}))
    return head, brain


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    tpl = load_template(2)
    rng = np.random.default_rng(0)
    k1, k2 = ScanKey("01", "1"), ScanKey("01", "2")
    _write_scan(out, tpl, k1, True, rng, score=3.217, percentile=99.4, flagged=True,
                scoring={"csf_weight": 0.5, "csf_quantile": 0.1, "csf_level": 0.4,
                         "csf_sigma": 15.0, "local_baseline_sigma": 8.0})
    # ses-1's native input and brain mask: the QC contour is drawn on them.
    _write_native(tmp_path_factory.mktemp("raw"), out, k1)
    _write_scan(out, tpl, k2, False, rng, score=0.8123, percentile=42.5, flagged=False)
    # ses-2 comes with its own QC image: it must be inlined instead of recomputed.
    qc_rel = Path("sub-01/figures/sub-01_ses-2_desc-given_qc.png")
    (out / qc_rel).parent.mkdir(parents=True, exist_ok=True)
    (out / qc_rel).write_bytes(figures.score_distribution([1, 2, 3], 2.0))
    so2 = ScanOutputs(k2)
    rec = json.loads((out / so2.scores).read_text())
    rec["qc"] = {"mask_contour_png": str(qc_rel)}
    (out / so2.scores).write_text(json.dumps(rec))
    # A failed scan of another participant, and its crash file.
    k3 = ScanKey("02")
    failed = {"scan_id": k3.scan_id, "participant_id": "sub-02", "session_id": None, "run": None,
              "status": "failed", "error": ERROR_MSG}
    (out / ScanOutputs(k3).scores).parent.mkdir(parents=True, exist_ok=True)
    (out / ScanOutputs(k3).scores).write_text(json.dumps(failed))
    (out / "logs").mkdir()
    (out / "logs" / "crash-20240501-120000-sub-02-registration.txt").write_text(
        "Node: registration of sub-02\nTraceback (most recent call last):\nRuntimeError: <boom>\n")
    lines = ["\t".join(GROUP_COLUMNS)]
    lines.append("sub-01\tses-1\tn/a\tsub-01_ses-1\tdae-ixi\t3.217\t99.4\tTrue\tok\tn/a\t2\t1304"
                 "\tsub-01.html")
    lines.append("sub-01\tses-2\tn/a\tsub-01_ses-2\tdae-ixi\t0.8123\t42.5\tFalse\tok\tn/a\t0\t0"
                 "\tsub-01.html")
    lines.append(f"sub-02\tn/a\tn/a\tsub-02\tdae-ixi\tn/a\tn/a\tn/a\tfailed\t{ERROR_MSG}\tn/a"
                 "\tn/a\tsub-02.html")
    (out / "group_anomaly.tsv").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def reports(out_dir: Path) -> dict[str, str]:
    p1 = build_participant_report(out_dir, "01")
    p2 = build_participant_report(out_dir, "sub-02")
    g = build_group_report(out_dir)
    assert p1 == out_dir / "sub-01.html" and p2 == out_dir / "sub-02.html"
    assert g == out_dir / "group_report.html"
    return {"sub-01": p1.read_text(), "sub-02": p2.read_text(), "group": g.read_text()}


def _no_external(text: str) -> None:
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert not URL_IN_CSS.search(text)
    assert "@import" not in text
    assert "<link" not in text.lower()


def test_participant_report_content(out_dir: Path, reports: dict[str, str]) -> None:
    text = reports["sub-01"]
    assert (out_dir / "sub-01.html").stat().st_size < 5 * 1024 * 1024
    for needle in ("sub-01_ses-1", "sub-01_ses-2", "3.217", "99.4", "0.8123", "42.5",
                   "FLAGGED", "normal", "normal ageing", "dae-ixi", "IXI",
                   "bids-anomaly /data /out participant", "2024-05-01T12:00:00", "torch 2.13.0",
                   # How the statmap treats CSF-dark voxels (zscore bundles weigh them at half).
                   "CSF-dark voxels in the statmap",
                   "weighted ×0.5 (below 0.4 of the local level)",
                   "removed (a Gaussian of 8 voxels)"):
        assert needle in text, needle
    # Cluster table values (numbers shown with at most 2 decimals).
    for needle in ("1256", "7.53", "5.91", "-24.5", "right", "left", "centroid_x"):
        assert needle in text, needle
    assert text.count("data:image/png;base64,") >= 8
    assert 'class="overlay-toggle"' in text
    assert 'data-testid="no-overlay"' in text  # ses-2 has an empty anomaly mask
    _no_external(text)
    # The given QC image for ses-2 is inlined byte-for-byte.
    given = (out_dir / "sub-01/figures/sub-01_ses-2_desc-given_qc.png").read_bytes()
    import base64

    assert base64.b64encode(given).decode() in text


def test_participant_figures_written(out_dir: Path, reports: dict[str, str]) -> None:
    figs = out_dir / "sub-01" / "figures"
    for name in ("sub-01_ses-1_desc-overlay_anomaly.png", "sub-01_ses-1_desc-input_anomaly.png",
                 "sub-01_ses-1_desc-recon_anomaly.png",
                 "sub-01_ses-1_desc-distribution_anomaly.png",
                 "sub-01_ses-1_desc-brainmask_qc.png", "sub-01_ses-1_desc-registration_qc.png",
                 "sub-01_ses-2_desc-overlay_anomaly.png"):
        assert (figs / name).read_bytes().startswith(PNG), name
    assert not list(figs.glob(".*tmp*"))  # atomic writes leave no temporaries
    assert not (figs / "sub-01_ses-2_desc-brainmask_qc.png").exists()  # given QC was used


def test_brain_mask_contour_over_native_input(out_dir: Path, reports: dict[str, str]) -> None:
    """ses-1: the native brain mask is outlined over the native input T1w, not the template."""
    text = reports["sub-01"]
    assert 'data-testid="mask-qc-native-sub-01_ses-1"' in text
    assert "over the input T1w in its native space (sub-01_ses-1_T1w.nii.gz)" in text
    png = (out_dir / "sub-01/figures/sub-01_ses-1_desc-brainmask_qc.png").read_bytes()
    import base64

    assert base64.b64encode(png).decode() in text
    assert not (out_dir / "sub-01/figures/sub-01_ses-1_space-MNI152NLin2009aSym"
                "_desc-brainmask_qc.png").exists()
    assert "registration edges" in text  # the template-space registration QC stays
    # The loader hands back the input and mask on one RAS, isotropic (1.5 mm) grid.
    from bids_anomaly.reports.loaders import load_native_qc

    image, mask, path = load_native_qc(out_dir, ScanOutputs(ScanKey("01", "1")))
    assert path.name == "sub-01_ses-1_T1w.nii.gz"
    assert image.shape == mask.shape and mask.any()
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask)  # the rim blends with the skull on the display grid
    assert np.all(image[inner] < 200) and np.any(image[~mask] > 200)  # skull stays outside
    assert 30 <= image.shape[2] <= 60  # 2 mm slices shown on a 1.5 mm grid
    assert load_native_qc(out_dir, ScanOutputs(ScanKey("01", "2"))) is None  # no native mask


def test_failed_participant_escaped(reports: dict[str, str]) -> None:
    text = reports["sub-02"]
    assert "FAILED" in text
    assert esc(ERROR_MSG) in text
    assert '<script>alert("x")</script>' not in text
    assert "crash-20240501-120000-sub-02-registration.txt" in text
    assert "RuntimeError: &lt;boom&gt;" in text
    _no_external(text)


def _embedded(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m
    return json.loads(m.group(1))


def test_group_report(reports: dict[str, str]) -> None:
    text = reports["group"]
    for sid in ("sub-01_ses-1", "sub-01_ses-2", "sub-02"):
        assert sid in text
    data = _embedded(text)
    assert [r["scan_id"] for r in data["rows"]] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
    assert data["links"] == ["sub-01.html", "sub-01.html", "sub-02.html"]
    assert data["rows"][0]["score"] == pytest.approx(3.217)
    assert data["rows"][2]["score"] is None and data["rows"][2]["error"] == ERROR_MSG
    assert "score" in data["numeric"] and "scan_id" not in data["numeric"]
    assert data["flagged"] == [True, False, None] and data["failed"] == [False, False, True]
    assert data["storage_key"].endswith(data["dataset"])
    assert len(data["healthy_scores"]) == 30
    assert 'href="sub-02.html"' in text  # failed-scan list links the participant report
    for tid in ("scan-table", "th-score", "th-scan_id", "th-rating", "filter-text",
                "flagged-only", "export-json", "export-tsv", "score-plot", "point-sub-01_ses-1"):
        assert f'data-testid="{tid}"' in text, tid
    for needle in ("localStorage", "'rating-'", "'comment-'", "new Blob", "accept", "review",
                   "reject", "normal ageing"):
        assert needle in text, needle
    # The error is escaped in the failed-scan list and cannot break out of the JSON script.
    assert esc(ERROR_MSG) in text
    assert '<script>alert("x")</script>' not in text
    _no_external(text)


def test_group_report_500_scans_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = ["\t".join(GROUP_COLUMNS)]
    for i in range(520):
        sub = f"{i // 2:03d}"
        score = rng.normal(1, 0.4)
        failed = i % 97 == 0
        lines.append("\t".join([
            f"sub-{sub}", f"ses-{i % 2 + 1}", "n/a", f"sub-{sub}_ses-{i % 2 + 1}", "dae",
            "n/a" if failed else f"{score:.4f}", "n/a" if failed else f"{rng.uniform(0, 100):.1f}",
            "n/a" if failed else str(score > 1.8), "failed" if failed else "ok",
            "out of memory" if failed else "n/a", str(rng.integers(0, 5)),
            f"{rng.uniform(0, 3000):.1f}", f"sub-{sub}.html",
        ]))
    (tmp_path / "group_anomaly.tsv").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    path = build_group_report(tmp_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, elapsed
    text = path.read_text()
    data = _embedded(text)
    assert len(data["rows"]) == 520 and len(set(data["ids"])) == 520
    assert text.count('class="pt ') == 520 - sum(1 for i in range(520) if i % 97 == 0)
    assert len(text) < 2_000_000


def test_group_report_without_table(tmp_path: Path) -> None:
    text = build_group_report(tmp_path).read_text()
    assert "group_anomaly.tsv not found" in text
    assert _embedded(text)["rows"] == []


def test_inline_scripts_parse(reports: dict[str, str], tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    for name, text in reports.items():
        scripts = re.findall(r"<script>(.*?)</script>", text, re.S)
        assert scripts, name
        js = tmp_path / f"{name}.js"
        js.write_text("\n".join(scripts))
        res = subprocess.run([node, "--check", str(js)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


# A minimal DOM, just enough to run the reports' inline scripts under node (no browser here).
_DOM_STUB = r"""
const fs = require('fs');
const html = fs.readFileSync(process.argv[2], 'utf8');
class ClassList {
  constructor(el) { this.el = el; }
  get l() { return (this.el.className || '').split(/\s+/).filter(Boolean); }
  add(c) { const l = this.l; if (!l.includes(c)) l.push(c); this.el.className = l.join(' '); }
  remove(c) { this.el.className = this.l.filter(x => x !== c).join(' '); }
  contains(c) { return this.l.includes(c); }
}
class El {
  constructor(tag) {
    this.tagName = tag.toUpperCase(); this.children = []; this.attrs = {};
    this.parentNode = null; this.className = ''; this.text = ''; this.listeners = {};
    this.classList = new ClassList(this); this.value = ''; this.checked = false; this.type = '';
  }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  appendChild(c) {
    if (c.isFrag) { for (const x of [...c.children]) this.appendChild(x); return c; }
    if (c.parentNode) c.parentNode.removeChild(c);
    c.parentNode = this; this.children.push(c); return c;
  }
  removeChild(c) { this.children.splice(this.children.indexOf(c), 1); c.parentNode = null; }
  set textContent(t) {
    for (const c of this.children) c.parentNode = null;
    this.children = []; this.text = String(t);
  }
  get textContent() { return this.text + this.children.map(c => c.textContent).join(''); }
  addEventListener(t, f) { (this.listeners[t] = this.listeners[t] || []).push(f); }
  fire(t, target) {
    const ev = {target: target || this, key: '', preventDefault() {}};
    for (let n = ev.target; n; n = n.parentNode) (n.listeners[t] || []).forEach(f => f(ev));
  }
  matches(sel) {
    const m = sel.match(/^([a-z]*)((?:\.[\w-]+)*)(?:\[type=(\w+)\])?(:checked)?$/i);
    if (m[1] && this.tagName !== m[1].toUpperCase()) return false;
    for (const c of m[2].split('.').filter(Boolean)) if (!this.classList.contains(c)) return false;
    return !(m[3] && this.type !== m[3]) && !(m[4] && !this.checked);
  }
  *walk() { for (const c of this.children) { yield c; yield* c.walk(); } }
  querySelectorAll(sel) {
    let cur = [this];
    for (const p of sel.trim().split(/\s+/)) {
      const nxt = new Set();
      for (const r of cur) for (const e of r.walk()) if (e.matches(p)) nxt.add(e);
      cur = [...nxt];
    }
    return cur;
  }
  querySelector(sel) { return this.querySelectorAll(sel)[0] || null; }
  closest(sel) {
    for (let n = this; n && n.tagName !== 'DOCUMENT'; n = n.parentNode) {
      if (n.matches(sel)) return n;
    }
    return null;
  }
  scrollIntoView() {} click() {}
  get id() { return this.getAttribute('id'); }
  set id(v) { this.setAttribute('id', v); }
}
const doc = new El('document');
doc.body = doc.appendChild(new El('body'));
doc.createElement = t => new El(t);
doc.createTextNode = t => { const e = new El('#text'); e.text = t; return e; };
doc.createDocumentFragment = () => { const f = new El('#frag'); f.isFrag = true; return f; };
doc.getElementById = id => { for (const e of doc.walk()) if (e.id === id) return e; return null; };
// Static elements with an id (and the toggles), rebuilt from the HTML.
let table = null, thead = null;
for (const [tagText, tag, id] of html.matchAll(/<(\w+)[^>]*\sid="([^"]+)"[^>]*>/g)) {
  if (tag === 'script') continue;
  const e = new El(tag); e.id = id;
  if (/type="checkbox"/.test(tagText)) e.type = 'checkbox';
  if (tag === 'img') e.src = 'img:' + id;
  if (id === 'scan-tbody') { table.appendChild(e); continue; }
  doc.body.appendChild(e);
  if (id === 'scan-table') {
    table = e; thead = e.appendChild(new El('thead'));
    const tr = thead.appendChild(new El('tr'));
    for (const m of html.matchAll(/<th data-col="([^"]+)"/g)) {
      tr.appendChild(new El('th')).setAttribute('data-col', m[1]);
    }
  }
}
const toggleRe = /class="overlay-toggle" checked data-target="([^"]+)" data-base="([^"]+)"/g;
for (const m of html.matchAll(toggleRe)) {
  const cb = doc.body.appendChild(new El('input'));
  cb.type = 'checkbox'; cb.className = 'overlay-toggle'; cb.checked = true;
  cb.setAttribute('data-target', m[1]); cb.setAttribute('data-base', m[2]);
}
const data = html.match(/<script type="application\/json" id="report-data">([\s\S]*?)<\/script>/);
if (data) {
  const s = doc.body.appendChild(new El('script')); s.id = 'report-data'; s.text = data[1];
}
const store = {}, downloads = [];
global.window = {alert: console.error, localStorage: {
  getItem: k => store[k] ?? null, setItem: (k, v) => { store[k] = v; }}};
global.document = doc;
global.URL = {createObjectURL: () => 'blob:x', revokeObjectURL() {}};
global.Blob = class { constructor(parts) { downloads.push(parts.join('')); } };
global.setTimeout = () => {};
for (const m of html.matchAll(/<script>([\s\S]*?)<\/script>/g)) eval(m[1]);
const out = {};
if (table) {
  const tbody = doc.getElementById('scan-tbody');
  const ths = thead.querySelectorAll('th');
  const col = c => ths.find(t => t.getAttribute('data-col') === c);
  const iscore = ths.indexOf(col('score'));
  const scores = () => tbody.children.map(tr => tr.children[iscore].textContent);
  out.rows = tbody.children.length;
  let t0 = Date.now(); thead.fire('click', col('score')); out.sort_ms = Date.now() - t0;
  out.asc = scores();
  thead.fire('click', col('score')); out.desc = scores();
  out.aria = col('score').getAttribute('aria-sort');
  const tr = tbody.children[0], radio = tr.querySelectorAll('input[type=radio]')[2];
  radio.checked = true; tbody.fire('change', radio);
  const cm = tr.querySelector('input.comment'); cm.value = 'look\tagain'; tbody.fire('input', cm);
  out.store = store;
  doc.getElementById('export-tsv').fire('click'); doc.getElementById('export-json').fire('click');
  out.downloads = downloads;
  const flag = doc.getElementById('flagged-only'); flag.checked = true; flag.fire('change');
  out.flagged_rows = tbody.children.length;
  tbody.children[0].children[0].fire('mouseover');
  out.highlighted = doc.getElementById('pt-' + tbody.children[0].getAttribute('data-i')).className;
} else {
  const cb = doc.querySelectorAll('input.overlay-toggle')[0];
  const im = doc.getElementById(cb.getAttribute('data-target')), before = im.src;
  cb.checked = false; cb.fire('change'); out.toggle = [before, im.src];
}
console.log(JSON.stringify(out));
"""


def _run_js(html_path: Path, tmp_path: Path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    stub = tmp_path / "dom_stub.js"
    stub.write_text(_DOM_STUB)
    res = subprocess.run([node, str(stub), str(html_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_group_report_js_behaviour(reports: dict[str, str], out_dir: Path, tmp_path: Path) -> None:
    res = _run_js(out_dir / "group_report.html", tmp_path)
    assert res["rows"] == 3
    assert res["asc"] == ["0.8123", "3.217", "n/a"]  # numeric sort, missing values last
    assert res["desc"] == ["3.217", "0.8123", "n/a"] and res["aria"] == "descending"
    data = _embedded(reports["group"])
    saved = json.loads(res["store"][data["storage_key"]])
    assert saved["sub-01_ses-1"]["rating"] == "reject"
    tsv, exported = res["downloads"]
    assert tsv.splitlines()[1].split("\t")[:1] == ["sub-01_ses-1"] and "look again" in tsv
    assert json.loads(exported)["ratings"][0]["comment"] == "look\tagain"
    assert res["flagged_rows"] == 1 and "hl" in res["highlighted"]


def test_group_report_js_sort_500(tmp_path: Path) -> None:
    test_group_report_500_scans_fast(tmp_path)
    res = _run_js(tmp_path / "group_report.html", tmp_path)
    assert res["rows"] == 520 and res["sort_ms"] < 500
    nums = [float(v) for v in res["asc"] if v != "n/a"]
    assert nums == sorted(nums) and res["asc"][-1] == "n/a"


def test_participant_overlay_toggle(reports: dict[str, str], out_dir: Path,
                                    tmp_path: Path) -> None:
    res = _run_js(out_dir / "sub-01.html", tmp_path)
    assert res["toggle"] == ["img:overlay-sub-01_ses-1", "img:input-sub-01_ses-1-T1w"]


def test_csf_weighting_in_words() -> None:
    """The report's CSF line for a fixed level, a quantile (bundles before the level), off,
    and a record written before scoring was recorded."""
    from bids_anomaly.reports.participant import _csf_weighting

    assert _csf_weighting({"csf_weight": 0.5, "csf_quantile": 0.1, "csf_level": 0.0}) == (
        "weighted ×0.5 (the darkest 10% of the brain, relative to the local level)")
    assert _csf_weighting({"csf_weight": 0.5, "csf_level": 0.4}) == (
        "weighted ×0.5 (below 0.4 of the local level)")
    assert _csf_weighting({"csf_weight": 1.0}) == "full weight"
    assert _csf_weighting(None) == "n/a"


def test_html_helpers() -> None:
    assert esc('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
    assert esc(None) == "n/a"
    s = json_script({"e": "</script><!--"}, "d")
    assert "</script><!--" not in s[: -len("</script>")]
    assert json.loads(re.search(r">(.*)</script>", s).group(1)) == {"e": "</script><!--"}
    assert safe_relative_href("sub-01.html") == "sub-01.html"
    for bad in ("javascript:alert(1)", "https://x.org/a.html", "//x.org", "../a.html", "n/a"):
        assert safe_relative_href(bad) is None, bad


def test_figures_shapes() -> None:
    vol = np.zeros((30, 36, 28), np.float32)
    vol[5:25, 6:30, 4:24] = np.linspace(0, 1, 20 * 24 * 20).reshape(20, 24, 20)
    stat = np.zeros_like(vol)
    stat[12:16, 14:18, 10:14] = 5.0
    png = mosaic(vol, overlay=stat, overlay_threshold=3.0, mask_contour=vol > 0,
                 n_slices=4)
    assert png.startswith(PNG)
    out = figures.anomaly_mosaics(vol, vol, stat, stat > 3, None)
    assert set(out) == {"input", "recon", "overlay"}
    assert all(v.startswith(PNG) for v in out.values())
    assert figures.registration_edges(vol, vol).startswith(PNG)
    assert figures.mask_contour(vol, vol > 0).startswith(PNG)
    assert figures.score_distribution([], None).startswith(PNG)
