// rare-celery web console: small helpers, no dependencies, nothing loaded from elsewhere.
"use strict";
(function () {
  function refreshOverview() {
    var box = document.getElementById("refresh");
    var tables = document.getElementById("tables");
    if (!box || !tables) return;
    var seconds = parseInt(box.getAttribute("data-seconds"), 10) || 5;
    var url = box.getAttribute("data-url");
    var state = document.getElementById("refresh-state");
    var button = document.getElementById("pause");
    var paused = false, timer = null;
    function schedule() { timer = window.setTimeout(tick, seconds * 1000); }
    function tick() {
      if (paused) return;
      fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      }).then(function (html) {
        // the fragment is made by the server's templates, which escape everything from messages
        tables.innerHTML = html;
        // UTC, 24-hour, as every other time on the console (not the browser's 12-hour local time)
        state.textContent = "refreshed " + new Date().toISOString().slice(11, 19) + " UTC, every " + seconds + " s";
      }).catch(function (e) {
        state.textContent = "could not refresh (" + e.message + "), trying again";
      }).then(function () { if (!paused) schedule(); });
    }
    button.addEventListener("click", function () {
      paused = !paused;
      button.textContent = paused ? "Resume" : "Pause";
      if (paused) { window.clearTimeout(timer); state.textContent = "paused"; } else { tick(); }
    });
    schedule();
  }

  function followJob() {
    var box = document.getElementById("job");
    if (!box || box.getAttribute("data-state") !== "running") return;
    var url = box.getAttribute("data-url");
    var bar = document.getElementById("job-progress");
    var text = document.getElementById("job-text");
    function poll() {
      fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) { return r.json(); })
        .then(function (job) {
          if (bar) { bar.max = Math.max(job.total, 1); bar.value = job.done; }
          if (text) text.textContent = job.done.toLocaleString() + " of " + job.total.toLocaleString() + " messages, " + job.seconds + " s";
          if (job.state !== "running") { window.location.reload(); return; }
          window.setTimeout(poll, 400);
        }).catch(function () { window.setTimeout(poll, 1500); });
    }
    window.setTimeout(poll, 300);
  }

  function tickAll() {
    var all = document.getElementById("tick-all");
    if (!all) return;
    all.addEventListener("change", function () {
      var boxes = document.querySelectorAll("input.tick");
      for (var i = 0; i < boxes.length; i++) boxes[i].checked = all.checked;
    });
  }

  document.addEventListener("DOMContentLoaded", function () { refreshOverview(); followJob(); tickAll(); });
})();
