
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
