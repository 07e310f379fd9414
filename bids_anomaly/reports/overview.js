
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
