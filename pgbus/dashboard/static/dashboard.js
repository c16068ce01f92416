// pgbus dashboard: the small progressive enhancement of server-rendered pages.
// Every element with data-refresh="/fragments/..." is re-rendered by the server every
// data-every milliseconds (paused while the tab is hidden or a field in it has focus);
// a "select all" checkbox ticks the boxes its data-select-all selector names.
"use strict";
(function () {
  function refresh(el) {
    const every = Number(el.dataset.every || 2000);
    async function tick() {
      if (!document.hidden && !el.contains(document.activeElement)) {
        try {
          const response = await fetch(el.dataset.refresh, {
            credentials: "same-origin",
            headers: { Accept: "text/html" },
          });
          if (response.ok) {
            el.innerHTML = await response.text();
            el.dataset.refreshedAt = String(Date.now());
          }
        } catch (error) {
          // the dashboard is restarting or the network is away: try again next time
        }
      }
      window.setTimeout(tick, every);
    }
    window.setTimeout(tick, every);
  }
  function selectAll(box) {
    box.addEventListener("change", function () {
      for (const other of document.querySelectorAll(box.dataset.selectAll)) {
        other.checked = box.checked;
      }
    });
  }
  document.querySelectorAll("[data-refresh]").forEach(refresh);
  document.querySelectorAll("[data-select-all]").forEach(selectAll);
})();
