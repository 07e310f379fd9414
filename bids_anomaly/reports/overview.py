"""The group report's overview mosaic: one row of thumbnails per scan (slicesdir style).

Rows are ordered flagged first, then by score (highest first), failed scans last; each row
links to the scan's section of its participant report. The rows follow the table's filter
(search box, "flagged only") and highlight together with the table row and the score point.
Thumbnails are the participant level's JPEG strips (:mod:`.thumbnails`), inlined as data URIs
(a few kB each: 200 scans stay near 1 MB).
"""

from __future__ import annotations

import base64
from pathlib import Path

from ..naming import ScanKey, ScanOutputs
from .html import esc, is_missing
from .loaders import key_from_name, strip_prefix
from .thumbnails import thumbnail_from_derivatives, write_thumbnail

__all__ = ["OVERVIEW_CSS", "OVERVIEW_JS", "overview_html", "thumbnail_uris"]


def _key(row: dict[str, str]) -> ScanKey | None:
    """The row's scan: from its scan id, else from its participant/session/run columns."""
    sid = row.get("scan_id")
    key = key_from_name(str(sid)) if not is_missing(sid) else ScanKey("")
    sub = key.subject or strip_prefix(row.get("participant_id"), "sub")
    if not sub:
        return None
    return ScanKey(sub, key.session or strip_prefix(row.get("session_id"), "ses"),
                   key.run or strip_prefix(row.get("run"), "run"), key.acquisition)


def thumbnail_uris(output_dir: Path, rows: list[dict[str, str]], failed: list[bool],
                   build_missing: bool = True) -> list[str | None]:
    """A JPEG data URI per row (None: no thumbnail). A scored scan without its strip (older
    outputs) gets one drawn from its derivatives, and written for the next report."""
    out: list[str | None] = []
    for row, bad in zip(rows, failed):
        key = _key(row)
        data = None
        if key is not None and not bad:
            path = output_dir / ScanOutputs(key).thumbnail
            if path.is_file():
                data = path.read_bytes()
            elif build_missing:
                written = write_thumbnail(output_dir, key)
                data = written.read_bytes() if written else thumbnail_from_derivatives(
                    output_dir, key)
        out.append("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
                   if data else None)
    return out


def overview_html(n_thumbs: int, n_rows: int) -> str:
    """The section; the rows are built by :data:`OVERVIEW_JS` from the report's data."""
    missing = n_rows - n_thumbs
    note = (f" {missing} scan(s) have no thumbnail (failed, or no derivatives): a placeholder "
            "stands in." if missing else "")
    return (
        '<h2 id="overview-title">Overview</h2>'
        '<p class="muted small">Every scan: axial slices of the preprocessed T1w in template '
        "space with the anomaly overlay (hot colours above the voxel threshold, the mask "
        "outlined). Flagged scans first, then by score. Hover a row to find it in the table "
        f"and the score plot; click it to open the participant report.{esc(note)}</p>"
        '<div id="overview" class="ov" data-testid="overview" role="list"></div>'
    )


OVERVIEW_CSS = """
.ov{display:flex;flex-direction:column;gap:.2rem;
max-height:36rem;overflow-y:auto;border:1px solid #ddd;padding:.3rem;margin-bottom:1rem}
.ov a{display:flex;align-items:center;gap:.5rem;text-decoration:none;color:inherit;
padding:.1rem .25rem;border-left:4px solid transparent}
.ov a.flagged{border-left-color:#c62828}.ov a.hl{background:#fff3c4}
.ov img,.ov .ph{width:314px;height:95px;flex:none;background:#000;image-rendering:auto}
.ov .ph{display:flex;align-items:center;justify-content:center;color:#aaa;font-size:.8em}
.ov .lab{font-size:.8em;line-height:1.25;min-width:6rem;overflow:hidden}
.ov .lab b{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
"""

# Runs after the table script, which exposes window.bidsAnomalyGroup (data, filter, highlight).
OVERVIEW_JS = r"""
(function(){
'use strict';
var G=window.bidsAnomalyGroup, box=document.getElementById('overview');
if(!G||!box||box.tagName!=='DIV'){return;}
var D=G.data, N=D.rows.length, items=new Array(N), order=[];
for(var i=0;i<N;i++){order.push(i);}
function rank(i){return D.failed[i]?2:(D.flagged[i]===true?0:1);}
function sc(i){var s=D.rows[i].score; return typeof s==='number'?s:-Infinity;}
order.sort(function(a,b){return rank(a)-rank(b)||sc(b)-sc(a)||a-b;});
for(var k=0;k<N;k++){
  var j=order[k], a=document.createElement(D.links[j]?'a':'div');
  a.className='ovrow'+(D.flagged[j]===true?' flagged':'');
  a.setAttribute('role','listitem'); a.setAttribute('data-i',j); a.id='ov-'+j;
  a.setAttribute('data-testid','ov-'+D.ids[j]);
  if(D.links[j]){var sid=D.rows[j].scan_id;
    a.href=D.links[j]+(D.links[j].indexOf('#')<0&&typeof sid==='string'&&sid&&sid!=='n/a'?
      '#scan-'+encodeURIComponent(sid):'');}
  var t=D.thumbs[j], im;
  if(t){im=document.createElement('img'); im.src=t; im.alt='overview of '+D.ids[j];
    im.width=314; im.height=95; im.decoding='async';}
  else{im=document.createElement('span'); im.className='ph';
    im.textContent=D.failed[j]?'failed: no image':'no thumbnail';}
  var lab=document.createElement('span'), b=document.createElement('b'); lab.className='lab';
  b.textContent=D.ids[j]; lab.appendChild(b);
  var s=D.rows[j].score;
  lab.appendChild(document.createTextNode((typeof s==='number'?'score '+(+s.toPrecision(4)):
    'no score')+(D.flagged[j]===true?' · FLAGGED':'')));
  a.appendChild(im); a.appendChild(lab); items[j]=a;
}
function render(){
  var frag=document.createDocumentFragment();
  for(var k=0;k<N;k++){var i=order[k]; if(G.visible(i)){frag.appendChild(items[i]);}}
  box.textContent=''; box.appendChild(frag);
}
G.onRender.push(render);
G.onHighlight.push(function(i,on){var a=items[i]; if(a){if(on){a.classList.add('hl');}
  else{a.classList.remove('hl');}}});
function idx(e){var a=e.target.closest('.ovrow'); return a?+a.getAttribute('data-i'):-1;}
box.addEventListener('mouseover',function(e){var i=idx(e); if(i>=0){G.highlight(i);}});
box.addEventListener('focusin',function(e){var i=idx(e); if(i>=0){G.highlight(i);}});
render();
})();
"""
