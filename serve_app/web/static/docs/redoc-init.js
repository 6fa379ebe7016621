// Starts ReDoc on /redoc with the schema URL the page names (data-openapi-url): a file, not an inline script,
// so the page's Content-Security-Policy holds.
"use strict";
(function () {
  const root = document.getElementById("redoc");
  Redoc.init(root.dataset.openapiUrl, {}, root);
})();
