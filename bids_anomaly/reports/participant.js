
(function(){
  document.querySelectorAll('input.overlay-toggle').forEach(function(cb){
    var im=document.getElementById(cb.getAttribute('data-target'));
    var base=document.getElementById(cb.getAttribute('data-base'));
    if(!im||!base){return;}
    var over=im.src;
    cb.addEventListener('change',function(){
      im.src=cb.checked?over:base.src;
      im.alt=cb.checked?'input with anomaly overlay':'input without overlay';
    });
  });
})();
