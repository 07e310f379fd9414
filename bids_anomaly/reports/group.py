"""Self-contained group report: every scan of ``group_anomaly.tsv`` in one sortable table.

``build_group_report(output_dir)`` writes ``OUTPUT_DIR/group_report.html``. The table is
rendered by inline JS from embedded JSON (fast with thousands of rows), the score
distribution is an inline SVG with one point per scan, and each scan has a rating widget
(accept / review / reject + comment) stored in the browser's localStorage under a key that
includes the dataset path; ratings export to JSON or TSV offline (Blob download).

When ``bids-anomaly evaluate`` has written ``evaluation_pooled.tsv`` (and
``evaluation_scans.tsv``) into the output directory, an "Evaluation" section shows the
pooled voxel metrics, the scan-level AUROC and the per-scan table; without those files the
section is left out.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_text
from .html import (
    AGEING_NOTE,
    NA,
    esc,
    fmt_num,
    fmt_score,
    is_missing,
    json_script,
    page,
    safe_relative_href,
    table,
    to_bool,
    to_float,
)
from .loaders import SCORES_GLOB, crash_files, read_json, read_tsv, strip_prefix
from .overview import OVERVIEW_CSS, OVERVIEW_JS, overview_html, thumbnail_uris

__all__ = ["build_group_report", "GROUP_TSV", "GROUP_REPORT", "EVAL_POOLED_TSV",
           "EVAL_SCANS_TSV"]

log = logging.getLogger(__name__)

GROUP_TSV = "group_anomaly.tsv"
GROUP_REPORT = "group_report.html"
STORAGE_PREFIX = "bids-anomaly:ratings:"
EVAL_POOLED_TSV = "evaluation_pooled.tsv"  # written by bids_anomaly.evaluation.write_evaluation
EVAL_SCANS_TSV = "evaluation_scans.tsv"
EVAL_JSON = "evaluation.json"
#: Per-scan evaluation rows shown inline (the TSV link has them all).
EVAL_MAX_INLINE_ROWS = 2000
ORACLE_LABEL = "oracle Dice (upper bound; uses the labels)"
_NON_NUMERIC = {"participant_id", "session_id", "run", "scan_id", "model", "flagged", "status",
                "error", "report"}

_CSS = """
.controls{display:flex;flex-wrap:wrap;gap:.5rem 1.2rem;align-items:center;margin:.6rem 0}
.controls input[type=search]{padding:.3rem .5rem;min-width:18rem}
.tablewrap{overflow-x:auto}
#scan-table th{cursor:pointer;white-space:nowrap;position:sticky;top:0;z-index:1}
#scan-table th[aria-sort=ascending]::after{content:" \\25B2";font-size:.75em}
#scan-table th[aria-sort=descending]::after{content:" \\25BC";font-size:.75em}
#scan-table td.err{max-width:22rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;
color:var(--red)}
#scan-table tr.hl td{background:#fff3c4}
#scan-table td.rating{white-space:nowrap}
#scan-table td.rating label{margin-right:.35rem}
#scan-table td.rating input.comment{width:11rem;margin-left:.2rem}
svg .pt{stroke:#fff;stroke-width:.8;cursor:pointer}
svg .pt.flagged{fill:#c62828}svg .pt.normal{fill:#2e7d32}svg .pt.unknown{fill:#6b7280}
svg .pt.hl{stroke:#000;stroke-width:2.5;r:7px}
svg .bar{fill:#c9d1d9}svg .axis{stroke:#555;stroke-width:1}
svg text{font-size:11px;fill:#444}
.legend span{margin-right:1rem}
""" + OVERVIEW_CSS

_JS = r"""
(function(){
'use strict';
var D=JSON.parse(document.getElementById('report-data').textContent);
var cols=D.columns, rows=D.rows, ids=D.ids, N=rows.length, numeric={};
D.numeric.forEach(function(c){numeric[c]=true;});
var RATINGS=['accept','review','reject'];
var KEY=D.storage_key, persistent=true, store={};
try{var raw=window.localStorage.getItem(KEY); store=raw?JSON.parse(raw):{};}
catch(e){persistent=false; store={};}
if(!store||typeof store!=='object'){store={};}
var info=document.getElementById('storage-info');
function showInfo(){
  var n=Object.keys(store).length;
  info.textContent=(persistent?
    'Ratings are saved in this browser (localStorage) for this dataset. ':
    'Ratings cannot be saved in this browser: export them before closing. ')+n+' rated.';
}
function save(){
  try{window.localStorage.setItem(KEY,JSON.stringify(store));}catch(e){persistent=false;}
  showInfo();
}
var tbody=document.getElementById('scan-tbody');
var table=document.getElementById('scan-table');
var trs=new Array(N), hay=new Array(N), order=[];
function el(tag,cls,text){var e=document.createElement(tag); if(cls){e.className=cls;}
  if(text!==undefined){e.textContent=text;} return e;}
function fmt(c,v){
  if(v===null||v===undefined||v===''){return 'n/a';}
  if(typeof v==='number'){
    if(c==='percentile'){return v.toFixed(1);}
    if(Number.isInteger(v)){return String(v);}
    return String(+v.toPrecision(4));
  }
  return String(v);
}
for(var i=0;i<N;i++){
  var r=rows[i], tr=document.createElement('tr'), parts=[];
  tr.setAttribute('data-i',i); tr.id='row-'+i; tr.setAttribute('data-testid','row-'+ids[i]);
  for(var j=0;j<cols.length;j++){
    var c=cols[j], v=r[c], t=fmt(c,v), td=el('td',numeric[c]?'num':'');
    if(c==='report'){
      if(D.links[i]){var a=el('a','',t==='n/a'?'report':t); a.href=D.links[i]; td.appendChild(a);}
      else{td.textContent=t;}
    }else if(c==='flagged'){
      var f=D.flagged[i];
      td.appendChild(el('span','badge '+(f===true?'flagged':f===false?'normal':'unknown'),
        f===true?'FLAGGED':f===false?'normal':t));
    }else if(c==='status'&&D.failed[i]){
      td.appendChild(el('span','badge failed',t));
    }else if(c==='error'&&t!=='n/a'){
      td.className='err'; td.textContent=t; td.title=t;
    }else{td.textContent=t;}
    parts.push(t);
    tr.appendChild(td);
  }
  var rt=el('td','rating'), cur=store[ids[i]]||{};
  for(var k=0;k<RATINGS.length;k++){
    var lab=el('label'), inp=document.createElement('input');
    inp.type='radio'; inp.name='rate-'+i; inp.value=RATINGS[k];
    inp.setAttribute('data-testid','rating-'+ids[i]+'-'+RATINGS[k]);
    if(cur.rating===RATINGS[k]){inp.checked=true;}
    lab.appendChild(inp); lab.appendChild(document.createTextNode(RATINGS[k])); rt.appendChild(lab);
  }
  var cm=document.createElement('input'); cm.type='text'; cm.className='comment';
  cm.placeholder='comment'; cm.value=cur.comment||'';
  cm.setAttribute('data-testid','comment-'+ids[i]); rt.appendChild(cm);
  tr.appendChild(rt);
  hay[i]=parts.join('\u0001').toLowerCase();
  trs[i]=tr; order.push(i);
}
var filterBox=document.getElementById('filter-text');
var flaggedOnly=document.getElementById('flagged-only');
var countEl=document.getElementById('row-count');
function visible(i){
  if(flaggedOnly.checked&&D.flagged[i]!==true){return false;}
  var q=filterBox.value.trim().toLowerCase();
  return !q||hay[i].indexOf(q)>=0;
}
// The overview mosaic (reports/overview.py) follows the filter and the highlight.
var API={data:D, visible:visible, highlight:function(i){highlight(i);}, onRender:[],
  onHighlight:[]};
window.bidsAnomalyGroup=API;
function render(){
  var frag=document.createDocumentFragment(), n=0;
  for(var k=0;k<order.length;k++){var i=order[k]; if(visible(i)){frag.appendChild(trs[i]); n++;}}
  tbody.textContent=''; tbody.appendChild(frag);
  countEl.textContent='showing '+n+' of '+N+' scans';
  API.onRender.forEach(function(f){f();});
}
var collator=new Intl.Collator(undefined,{numeric:true,sensitivity:'base'});
var sortCol=null, sortDir=1;
function keyOf(c,i){
  if(c==='_rating'){var s=store[ids[i]]; return s&&s.rating?s.rating:null;}
  var v=rows[i][c]; return (v===undefined||v===''||v==='n/a')?null:v;
}
function sortBy(c){
  sortDir=(sortCol===c)?-sortDir:1; sortCol=c;
  var keys=new Array(N), num=!!numeric[c];
  for(var i=0;i<N;i++){keys[i]=keyOf(c,i);}
  order.sort(function(a,b){
    var x=keys[a], y=keys[b];
    if(x===null||y===null){ if(x===y){return a-b;} return x===null?1:-1; }
    var d=num?(x-y):collator.compare(String(x),String(y));
    return d!==0?d*sortDir:a-b;
  });
  var ths=table.querySelectorAll('thead th');
  for(var k=0;k<ths.length;k++){
    ths[k].setAttribute('aria-sort',ths[k].getAttribute('data-col')===c?
      (sortDir>0?'ascending':'descending'):'none');
  }
  render();
}
table.querySelector('thead').addEventListener('click',function(e){
  var th=e.target.closest('th'); if(th){sortBy(th.getAttribute('data-col'));}
});
table.querySelector('thead').addEventListener('keydown',function(e){
  var th=e.target.closest('th');
  if(th&&(e.key==='Enter'||e.key===' ')){e.preventDefault(); sortBy(th.getAttribute('data-col'));}
});
filterBox.addEventListener('input',render);
flaggedOnly.addEventListener('change',render);
function rowIndex(node){var tr=node.closest('tr'); return tr?+tr.getAttribute('data-i'):-1;}
function record(i){
  var tr=trs[i], chk=tr.querySelector('input[type=radio]:checked');
  var cmt=tr.querySelector('input.comment').value;
  if(!chk&&!cmt){delete store[ids[i]];}
  else{store[ids[i]]={rating:chk?chk.value:'',comment:cmt,updated:new Date().toISOString()};}
  save();
}
tbody.addEventListener('change',function(e){var i=rowIndex(e.target); if(i>=0){record(i);}});
tbody.addEventListener('input',function(e){
  if(e.target.classList.contains('comment')){record(rowIndex(e.target));}
});
var hl=-1;
function highlight(i){
  if(hl===i){return;}
  if(hl>=0){trs[hl].classList.remove('hl'); var o=document.getElementById('pt-'+hl);
    if(o){o.classList.remove('hl');}
    var prev=hl; API.onHighlight.forEach(function(f){f(prev,false);});}
  hl=i;
  if(i>=0){trs[i].classList.add('hl'); var p=document.getElementById('pt-'+i);
    if(p){p.classList.add('hl'); p.parentNode.appendChild(p);}
    API.onHighlight.forEach(function(f){f(i,true);});}
}
tbody.addEventListener('mouseover',function(e){var i=rowIndex(e.target); if(i>=0){highlight(i);}});
tbody.addEventListener('focusin',function(e){var i=rowIndex(e.target); if(i>=0){highlight(i);}});
var plot=document.getElementById('score-plot');
if(plot){
  plot.addEventListener('mouseover',function(e){
    var p=e.target.closest('.pt'); if(p){highlight(+p.getAttribute('data-i'));}
  });
  plot.addEventListener('click',function(e){
    var p=e.target.closest('.pt'); if(!p){return;}
    var i=+p.getAttribute('data-i');
    if(!visible(i)){filterBox.value=''; flaggedOnly.checked=false; render();}
    highlight(i); trs[i].scrollIntoView({block:'center'});
  });
}
function ratingRows(){
  var out=[];
  for(var i=0;i<N;i++){
    var s=store[ids[i]]; if(!s){continue;}
    out.push({scan_id:ids[i],participant_id:rows[i].participant_id,session_id:rows[i].session_id,
      run:rows[i].run,model:rows[i].model,score:rows[i].score,flagged:D.flagged[i],
      rating:s.rating||'',comment:s.comment||'',updated:s.updated||''});
  }
  return out;
}
function download(name,text,type){
  var url=URL.createObjectURL(new Blob([text],{type:type}));
  var a=document.createElement('a'); a.href=url; a.download=name;
  document.body.appendChild(a); a.click(); document.body.removeChild(a);
  setTimeout(function(){URL.revokeObjectURL(url);},1000);
}
function stamp(){return new Date().toISOString().replace(/[:.]/g,'-');}
document.getElementById('export-json').addEventListener('click',function(){
  var doc={dataset:D.dataset,exported:new Date().toISOString(),ratings:ratingRows()};
  download('ratings_'+stamp()+'.json',JSON.stringify(doc,null,2),'application/json');
});
document.getElementById('export-tsv').addEventListener('click',function(){
  var fields=['scan_id','participant_id','session_id','run','model','score','flagged','rating',
    'comment','updated'];
  var lines=[fields.join('\t')];
  ratingRows().forEach(function(r){
    lines.push(fields.map(function(f){var v=r[f];
      return (v===null||v===undefined||v==='')?'n/a':String(v).replace(/[\t\r\n]+/g,' ');
    }).join('\t'));
  });
  download('ratings_'+stamp()+'.tsv',lines.join('\n')+'\n','text/tab-separated-values');
});
document.getElementById('import-json').addEventListener('change',function(e){
  var file=e.target.files&&e.target.files[0]; if(!file){return;}
  var reader=new FileReader();
  reader.onload=function(){
    try{
      var doc=JSON.parse(reader.result), list=Array.isArray(doc)?doc:(doc.ratings||[]);
      list.forEach(function(r){ if(r&&r.scan_id!==undefined){store[String(r.scan_id)]=
        {rating:r.rating||'',comment:r.comment||'',updated:r.updated||''};}});
      save();
      for(var i=0;i<N;i++){
        var s=store[ids[i]]||{}, tr=trs[i];
        tr.querySelectorAll('input[type=radio]').forEach(function(x){x.checked=(x.value===s.rating);});
        tr.querySelector('input.comment').value=s.comment||'';
      }
    }catch(err){window.alert('Cannot import ratings: '+err);}
  };
  reader.readAsText(file);
});
showInfo();
render();
})();
""" + OVERVIEW_JS


def build_group_report(output_dir: Path) -> Path:
    """Write ``OUTPUT_DIR/group_report.html`` from ``group_anomaly.tsv`` and return its path."""
    output_dir = Path(output_dir)
    tsv = output_dir / GROUP_TSV
    problem = None
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    if tsv.is_file():
        try:
            columns, rows = read_tsv(tsv)
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot read {GROUP_TSV}: {exc}"
    else:
        problem = f"{GROUP_TSV} not found in the output directory"
    if problem:
        log.warning("group report: %s", problem)
    text = _render(output_dir, columns, rows, problem)
    return write_text(output_dir / GROUP_REPORT, text)


def _render(output_dir: Path, columns: list[str], rows: list[dict[str, str]],
            problem: str | None) -> str:
    dataset = str(output_dir.resolve())
    numeric = [c for c in columns if _is_numeric(c, rows)]
    ids = _row_ids(rows)
    flagged = [to_bool(r.get("flagged")) for r in rows]
    failed = [_is_failed(r) for r in rows]
    links = [_link(output_dir, r) for r in rows]
    data_rows = [{c: (to_float(r[c]) if c in numeric else r[c]) for c in columns} for r in rows]
    reference = _reference(output_dir, rows)
    thumbs = thumbnail_uris(output_dir, rows, failed)
    data = {
        "dataset": dataset,
        "storage_key": STORAGE_PREFIX + dataset,
        "columns": columns,
        "numeric": numeric,
        "rows": data_rows,
        "ids": ids,
        "flagged": flagged,
        "failed": failed,
        "links": links,
        "healthy_scores": reference.get("healthy_scores", []),
        "reference_model": reference.get("model"),
        "thumbs": thumbs,
    }
    n_part = len({r.get("participant_id") for r in rows})
    n_flag = sum(1 for f in flagged if f is True)
    n_fail = sum(failed)
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    body = [
        "<h1>Anomaly detection: group report</h1>",
        f'<p class="muted small">bids-anomaly {esc(__version__)} · generated {esc(now)} · '
        f"dataset <code>{esc(dataset)}</code></p>",
        f'<p data-testid="summary"><b>{len(rows)}</b> scans of <b>{n_part}</b> participants · '
        f'<span class="badge flagged">{n_flag} flagged</span> '
        f'<span class="badge failed">{n_fail} failed</span></p>',
        f'<div class="note" data-testid="ageing-note"><b>Interpretation.</b> {esc(AGEING_NOTE)}'
        "</div>",
    ]
    if problem:
        body.append(f'<div class="error" data-testid="group-error">{esc(problem)}</div>')
    body.append("<h2>Score distribution</h2>")
    body.append(_score_svg(rows, ids, flagged, reference))
    body.append(_reference_html(reference))
    if rows:
        body.append(overview_html(sum(1 for t in thumbs if t), len(rows)))
    body.append(_table_html(columns, numeric))
    body.append(_failed_html(rows, ids, failed, links))
    body.append(_evaluation_html(output_dir))
    body.append(_crash_html(output_dir))
    body.append(json_script(data, "report-data"))
    body.append('<noscript><p class="error">The scan table needs JavaScript.</p></noscript>')
    return page("bids-anomaly group report", "\n".join(body), css=_CSS, script=_JS)


# --------------------------------------------------------------------------- data helpers


def _is_numeric(column: str, rows: list[dict[str, str]]) -> bool:
    if column in _NON_NUMERIC:
        return False
    seen = False
    for r in rows:
        v = r.get(column)
        if is_missing(v):
            continue
        if to_float(v) is None:
            return False
        seen = True
    return seen


def _row_ids(rows: list[dict[str, str]]) -> list[str]:
    """Unique rating keys: scan_id (plus model, then row number, for duplicates)."""
    ids: list[str] = []
    seen: set[str] = set()
    for i, r in enumerate(rows):
        base = r.get("scan_id")
        if is_missing(base):
            parts = [r.get("participant_id"), r.get("session_id"), r.get("run")]
            base = "_".join(str(p) for p in parts if not is_missing(p)) or f"row{i + 1}"
        rid = str(base)
        if rid in seen and not is_missing(r.get("model")):
            rid = f"{base}@{r['model']}"
        if rid in seen:
            rid = f"{base}#{i + 1}"
        seen.add(rid)
        ids.append(rid)
    return ids


def _is_failed(row: dict[str, str]) -> bool:
    status = str(row.get("status", NA)).strip().lower()
    if status in ("ok", "success", "succeeded"):
        return False
    return status not in ("n/a", "") or not is_missing(row.get("error"))


def _link(output_dir: Path, row: dict[str, str]) -> str | None:
    href = safe_relative_href(row.get("report"))
    if href:
        return href
    sub = strip_prefix(row.get("participant_id"), "sub")
    if sub and (output_dir / f"sub-{sub}.html").is_file():
        return safe_relative_href(f"sub-{sub}.html")
    return None


def _reference(output_dir: Path, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Healthy reference scores and threshold from the first scores record that has them."""
    tried = 0
    for r in rows:
        sub = strip_prefix(r.get("participant_id"), "sub")
        if not sub or _is_failed(r) or tried >= 5:
            continue
        tried += 1
        root = output_dir / f"sub-{sub}"
        if not root.is_dir():
            continue
        sid = r.get("scan_id")
        pattern = SCORES_GLOB if is_missing(sid) else glob.escape(sid) + SCORES_GLOB[1:]
        candidates = sorted(root.rglob(pattern))
        for path in candidates[:3]:
            obj, _ = read_json(path)
            if not obj:
                continue
            healthy = [v for v in (to_float(x) for x in obj.get("healthy_scores") or [])
                       if v is not None]
            if healthy:
                model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
                ref = obj.get("reference") if isinstance(obj.get("reference"), dict) else {}
                return {"healthy_scores": healthy, "threshold": to_float(obj.get("threshold")),
                        "model": model.get("name"), "status": ref}
    return {}


def _reference_html(reference: dict[str, Any]) -> str:
    """How many healthy scans the percentiles, flags and thresholds rest on (and a warning)."""
    healthy = reference.get("healthy_scores") or []
    if not healthy:
        return ('<p class="muted small" data-testid="reference-size">No healthy reference '
                "scores found in the scans' records.</p>")
    status = reference.get("status") or {}
    n = status.get("n_scans", len(healthy))
    cohort = status.get("cohort") if isinstance(status.get("cohort"), dict) else {}
    where = f" ({esc(cohort.get('dataset'))})" if cohort.get("dataset") else ""
    model = f" of model <b>{esc(reference['model'])}</b>" if reference.get("model") else ""
    text = (f"Percentiles, flags and voxel thresholds rest on <b>{esc(fmt_num(n, 0))}</b> "
            f"healthy reference scans{model}{where}.")
    if status.get("level") in ("warning", "refused"):
        msg = str(status.get("message", ""))
        return (f'<div class="error" data-testid="reference-size"><b>Small healthy '
                f"reference.</b> {text} {esc(msg[:1].upper() + msg[1:])}</div>")
    return f'<p data-testid="reference-size">{text}</p>'


# --------------------------------------------------------------------------- HTML pieces


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + 1e-9 * span:
        out.append(round(v, 10))
        v += step
    return out


def _jitter(key: str) -> float:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:6], 16) / 0xFFFFFF


def _score_svg(rows: list[dict[str, str]], ids: list[str], flagged: list[bool | None],
               reference: dict[str, Any]) -> str:
    scores = [to_float(r.get("score")) for r in rows]
    pts = [(i, s) for i, s in enumerate(scores) if s is not None]
    healthy = reference.get("healthy_scores") or []
    thr = reference.get("threshold")
    values = [s for _, s in pts] + list(healthy) + ([thr] if thr is not None else [])
    if not values:
        return '<p class="muted" data-testid="score-plot">No scores to plot.</p>'
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.04 or 0.5
    lo, hi = lo - pad, hi + pad
    w, h, left, right, top = 960, 230, 40, 16, 10
    band_scans = (top, 130)  # y range of scan points
    base = 200  # x axis position; the healthy histogram sits between 140 and 200

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (w - left - right)

    parts = [f'<svg id="score-plot" data-testid="score-plot" viewBox="0 0 {w} {h}" '
             f'width="100%" style="max-width:{w}px" role="img" '
             'aria-label="anomaly scores of all scans">']
    if healthy:
        nb = min(40, max(8, int(math.sqrt(len(healthy))) * 2))
        width = (hi - lo) / nb
        counts = [0] * nb
        for v in healthy:
            counts[min(nb - 1, int((v - lo) / width))] += 1
        cmax = max(counts)
        for b, c in enumerate(counts):
            if c:
                bh = 55 * c / cmax
                parts.append(f'<rect class="bar" x="{x(lo + b * width):.1f}" y="{base - bh:.1f}" '
                             f'width="{max(1.0, x(lo + width) - x(lo) - 1):.1f}" '
                             f'height="{bh:.1f}"></rect>')
    parts.append(f'<line class="axis" x1="{left}" x2="{w - right}" y1="{base}" y2="{base}"></line>')
    for t in _ticks(lo, hi):
        parts.append(f'<line class="axis" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{base}" '
                     f'y2="{base + 4}"></line><text x="{x(t):.1f}" y="{base + 16}" '
                     f'text-anchor="middle">{esc(fmt_num(t, 4))}</text>')
    if thr is not None:
        parts.append(f'<line x1="{x(thr):.1f}" x2="{x(thr):.1f}" y1="{top}" y2="{base}" '
                     'stroke="#555" stroke-dasharray="4 3"><title>flag threshold '
                     f"{esc(fmt_score(thr))}</title></line>")
    span = band_scans[1] - band_scans[0]
    for i, s in pts:
        f = flagged[i]
        cls = "flagged" if f is True else "normal" if f is False else "unknown"
        cy = band_scans[0] + 6 + _jitter(ids[i]) * (span - 12)
        parts.append(f'<circle id="pt-{i}" class="pt {cls}" data-i="{i}" '
                     f'data-testid="point-{esc(ids[i])}" cx="{x(s):.1f}" cy="{cy:.1f}" r="4">'
                     f"<title>{esc(ids[i])}: {esc(fmt_score(s))}</title></circle>")
    parts.append(f'<text x="{w - right}" y="{h - 2}" text-anchor="end">anomaly score</text>')
    parts.append("</svg>")
    model = reference.get("model")
    ref_txt = (f"grey bars: healthy reference scores (n={len(healthy)}"
               + (f", model {esc(model)}" if model else "") + ")") if healthy else ""
    legend = ('<p class="legend small muted"><span>● red: flagged</span><span>● green: normal'
              "</span>" + (f"<span>{ref_txt}</span>" if ref_txt else "")
              + ("<span>dashed: flag threshold</span>" if thr is not None else "")
              + "<span>hover a row to find its point; click a point to find its row</span></p>")
    return "".join(parts) + legend


def _table_html(columns: list[str], numeric: list[str]) -> str:
    heads = []
    for c in columns:
        cls = ' class="num"' if c in numeric else ""
        heads.append(f'<th data-col="{esc(c)}" data-testid="th-{esc(c)}" aria-sort="none" '
                     f'tabindex="0" scope="col"{cls}>{esc(c)}</th>')
    heads.append('<th data-col="_rating" data-testid="th-rating" aria-sort="none" tabindex="0" '
                 'scope="col">rating</th>')
    return (
        "<h2>Scans</h2>"
        '<div class="controls">'
        '<input type="search" id="filter-text" data-testid="filter-text" '
        'placeholder="filter (any column)" aria-label="filter rows">'
        '<label><input type="checkbox" id="flagged-only" data-testid="flagged-only"> '
        "flagged only</label>"
        '<span id="row-count" class="muted" data-testid="row-count"></span></div>'
        '<div class="controls">'
        '<button type="button" id="export-json" data-testid="export-json">Export ratings (JSON)'
        "</button>"
        '<button type="button" id="export-tsv" data-testid="export-tsv">Export ratings (TSV)'
        "</button>"
        '<label class="small">import ratings (JSON) <input type="file" id="import-json" '
        'data-testid="import-json" accept=".json,application/json"></label>'
        '<span id="storage-info" class="muted small" data-testid="storage-info"></span></div>'
        '<p class="muted small">Click a column header to sort (again to reverse).</p>'
        '<div class="tablewrap"><table id="scan-table" data-testid="scan-table">'
        f"<thead><tr>{''.join(heads)}</tr></thead>"
        '<tbody id="scan-tbody" data-testid="scan-tbody"></tbody></table></div>'
    )


def _failed_html(rows: list[dict[str, str]], ids: list[str], failed: list[bool],
                 links: list[str | None]) -> str:
    items = []
    for i, r in enumerate(rows):
        if not failed[i]:
            continue
        link = f' (<a href="{esc(links[i])}">report</a>)' if links[i] else ""
        err = r.get("error")
        items.append(f"<li><b>{esc(ids[i])}</b>{link}: status {esc(r.get('status', NA))}"
                     f'<div class="error">{esc(err if not is_missing(err) else "no error message")}'
                     "</div></li>")
    if not items:
        return ""
    return (f"<h2>Failed scans ({len(items)})</h2>"
            f'<ul data-testid="failed-scans">{"".join(items)}</ul>')


def _crash_html(output_dir: Path) -> str:
    crashes = crash_files(output_dir)
    if not crashes:
        return ""
    items = []
    for c in crashes:
        head = f"<pre>{esc(chr(10).join(c.head))}</pre>" if c.head else ""
        items.append(f"<li><code>{esc(c.path)}</code>{head}</li>")
    return f'<h2>Crash files</h2><ul data-testid="crash-files">{"".join(items)}</ul>'


# --------------------------------------------------------------------------- evaluation


def _fpr_cols(columns: list[str], prefix: str) -> list[tuple[str, float]]:
    """``(column, fpr)`` of the columns named ``<prefix><fpr>``, largest FPR first."""
    out = []
    for c in columns:
        if c.startswith(prefix):
            fpr = to_float(c[len(prefix):])
            if fpr is not None:
                out.append((c, fpr))
    return sorted(out, key=lambda item: -item[1])


def _pct(fpr: float) -> str:
    return f"{fmt_num(fpr * 100, 4)}%"


def _metric_cells(row: dict[str, str], cols: list[tuple[str, str]]) -> list[str]:
    return [fmt_num(row.get(c), 3) for c, _ in cols]


def _evaluation_html(output_dir: Path) -> str:
    """The "Evaluation" section, or "" when ``evaluate`` wrote no table into ``output_dir``."""
    pooled_tsv = output_dir / EVAL_POOLED_TSV
    if not pooled_tsv.is_file():
        return ""
    head = '<h2 id="evaluation">Evaluation</h2>'
    try:
        pcols, prows = read_tsv(pooled_tsv)
    except (OSError, UnicodeDecodeError) as exc:
        return (f'<section data-testid="evaluation">{head}<div class="error">cannot read '
                f"{esc(EVAL_POOLED_TSV)}: {esc(exc)}</div></section>")
    dice_cols = _fpr_cols(pcols, "dice_fpr")
    obs_cols = dict(_fpr_cols(pcols, "fpr_observed_fpr"))
    obs_by_fpr = {fpr: c for c, fpr in obs_cols.items()}
    metric_cols = [("auroc", "voxel AUROC"), ("auprc", "voxel AUPRC"),
                   ("oracle_dice", ORACLE_LABEL)]
    metric_cols += [(c, f"Dice at calibrated FPR {_pct(fpr)}") for c, fpr in dice_cols]
    metric_cols += [(obs_by_fpr[fpr], f"observed FPR (target {_pct(fpr)})")
                    for _, fpr in dice_cols if fpr in obs_by_fpr]
    metric_cols += [("scan_auroc", "scan-level AUROC")]
    header = ["model", "scans (pathological)", *[label for _, label in metric_cols]]
    table_rows = []
    for r in prows:
        scans = f"{fmt_num(r.get('n_scans'), 0)} ({fmt_num(r.get('n_pathological'), 0)})"
        table_rows.append([r.get("model", NA), scans, *_metric_cells(r, metric_cols)])
    pooled = table(header, table_rows, numeric=set(header[1:]), testid="evaluation-pooled")

    scan_auroc = ", ".join(
        f"<b>{esc(r.get('model', NA))}</b> {esc(fmt_num(r.get('scan_auroc'), 3))}" for r in prows)
    meta, _ = read_json(output_dir / EVAL_JSON)
    meta = meta if isinstance(meta, dict) else {}
    dilation = to_float(meta.get("MaskDilation")) or 0
    region = "the native brain mask" + (
        f" dilated by {fmt_num(dilation, 0)} voxel(s)" if dilation else "")
    written = _dt.datetime.fromtimestamp(pooled_tsv.stat().st_mtime).astimezone()
    parts = [
        '<section data-testid="evaluation">', head,
        f'<p class="muted small">Written by <code>bids-anomaly evaluate</code> on '
        f"{esc(written.isoformat(timespec='seconds'))} against lesion masks "
        "(labels are used only here, never in training or calibration).</p>",
        f"<p>Voxel metrics are computed inside {esc(region)}, <b>pooled</b> over the voxels of "
        "all evaluated scans (per-scan values below). The <b>oracle Dice</b> is the best Dice "
        "over all thresholds, chosen with the lesion labels: an upper bound that no user "
        "gets without labels. The <b>Dice at the calibrated thresholds</b> (set on healthy "
        "participants for a voxel false-positive rate) is the operating point a user "
        "actually gets. The <b>observed FPR</b> of healthy scans counts only voxels where the "
        "anomaly map is defined (the brain mask eroded as scoring erodes it), and says how many "
        "healthy scans it rests on.</p>",
        pooled,
        f'<p data-testid="evaluation-scan-auroc">Scan-level AUROC (healthy vs pathological '
        f"scans, from the per-scan score): {scan_auroc or NA}</p>",
    ]
    group_tsv = output_dir / GROUP_TSV
    if group_tsv.is_file() and group_tsv.stat().st_mtime > pooled_tsv.stat().st_mtime + 1:
        parts.append('<div class="note" data-testid="evaluation-stale">The scan table is newer '
                     "than this evaluation: run <code>bids-anomaly evaluate</code> again to "
                     "update it.</div>")
    parts.append(_evaluation_scans_html(output_dir))
    skipped = [str(x) for x in meta.get("Skipped") or []]
    if skipped:
        items = "".join(f"<li>{esc(x)}</li>" for x in skipped)
        parts.append(f"<details><summary>{len(skipped)} scan(s) not evaluated</summary>"
                     f'<ul data-testid="evaluation-skipped">{items}</ul></details>')
    parts.append("</section>")
    return "".join(parts)


def _evaluation_scans_html(output_dir: Path) -> str:
    scans_tsv = output_dir / EVAL_SCANS_TSV
    if not scans_tsv.is_file():
        return ""
    try:
        cols, rows = read_tsv(scans_tsv)
    except (OSError, UnicodeDecodeError) as exc:
        return f'<div class="error">cannot read {esc(EVAL_SCANS_TSV)}: {esc(exc)}</div>'
    metric_cols = [("auroc", "voxel AUROC"), ("auprc", "voxel AUPRC"),
                   ("oracle_dice", ORACLE_LABEL)]
    metric_cols += [(c, f"Dice at calibrated FPR {_pct(fpr)}")
                    for c, fpr in _fpr_cols(cols, "dice_fpr")]
    header = ["model", "scan", "pathological", "lesion voxels",
              *[label for _, label in metric_cols], "score"]
    shown = rows[:EVAL_MAX_INLINE_ROWS]
    body = [[r.get("model", NA), r.get("scan_id", NA), r.get("pathological", NA),
             fmt_num(r.get("lesion_voxels"), 0), *_metric_cells(r, metric_cols),
             fmt_score(r.get("score"))] for r in shown]
    more = (f" (first {len(shown)} of {len(rows)} rows; all in the TSV)"
            if len(rows) > len(shown) else "")
    href = safe_relative_href(EVAL_SCANS_TSV)
    link = f'<a href="{esc(href)}">{esc(EVAL_SCANS_TSV)}</a>' if href else esc(EVAL_SCANS_TSV)
    return (f"<details data-testid=\"evaluation-scans\"><summary>Per-scan metrics ({len(rows)} "
            f"rows){more}: {link}</summary>"
            + table(header, body, numeric=set(header[3:]), testid="evaluation-scans-table")
            + "</details>")
