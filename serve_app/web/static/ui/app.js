// trailcam-reid web UI: keyboard shortcuts of the review queue. No inline scripts (the CSP allows only these files).
(function () {
  "use strict";
  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }
  function click(selector) {
    var el = document.querySelector(selector);
    if (el) { el.click(); return true; }
    return false;
  }
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    var form = document.getElementById("decision");
    if (!form) { return; }
    if (event.key === "Escape" && typing(event.target)) { event.target.blur(); event.preventDefault(); return; }
    if (event.key === "Enter" && event.target && event.target.id === "new_name") {
      event.preventDefault();
      click("#decide-new");
      return;
    }
    if (typing(event.target)) { return; }
    var handled = false;
    if (/^[1-5]$/.test(event.key)) { handled = click("[data-key='" + event.key + "']"); }
    else if (event.key === "n") {
      var name = document.getElementById("new_name");
      if (name && name.value.trim()) { handled = click("#decide-new"); } else if (name) { name.focus(); handled = true; }
    }
    else if (event.key === "u") { handled = click("#decide-unassign"); }
    else if (event.key === "s" || event.key === "ArrowRight") { handled = click("#next-item"); }
    else if (event.key === "ArrowLeft") { handled = click("#previous-item"); }
    if (handled) { event.preventDefault(); }
  });
})();
