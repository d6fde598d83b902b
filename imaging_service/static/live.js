// Live updates of the queue and task pages: poll the page's JSON every 2 seconds and
// update the fields in place.  The pages are complete without this script.
(function () {
  "use strict";
  var root = document.querySelector("[data-live]");
  if (!root) { return; }
  var url = root.getAttribute("data-live");
  var terminal = {completed: 1, cancelled: 1, failed: 1};

  function setField(scope, name, value) {
    var el = scope.querySelector('[data-field="' + name + '"]');
    if (el && el.textContent !== String(value)) { el.textContent = value; }
  }

  function update(row, t) {
    row.className = row.className.replace(/\brow-[a-z-]+/, "row-" + t.state);
    var state = row.querySelector('[data-field="state"]');
    if (state) { state.className = "state state-" + t.state; state.textContent = t.state_words; }
    setField(row, "step", t.step || "");
    setField(row, "progress", t.progress);
    setField(row, "message", t.message);
    setField(row, "bytes_words", t.bytes_words || "");
    setField(row, "heartbeat_age", t.heartbeat_age || "");
    setField(row, "eta", t.eta || "");
    var bar = row.querySelector('[data-field="bar"]');
    if (bar) { bar.style.width = t.progress + "%"; }
  }

  function renderLog(body, lines) {
    while (body.firstChild) { body.removeChild(body.firstChild); }
    lines.forEach(function (line) {
      var tr = document.createElement("tr");
      tr.className = "level-" + line[3];
      [["when", line[0]], ["what", line[1]], ["", line[2]]].forEach(function (cell) {
        var td = document.createElement("td");
        if (cell[0]) { td.className = cell[0]; }
        td.textContent = cell[1];
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function reload(why) {
    // Kept for the next page (tests read it): why the page reloaded itself.
    try { window.sessionStorage.setItem("imaging-reload", why); } catch (e) { /* private mode */ }
    window.location.reload();
  }

  var known = {};
  document.querySelectorAll("[data-task]").forEach(function (row) {
    known[row.getAttribute("data-task")] = true;
  });

  function tick() {
    fetch(url, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { reload("signed out"); return null; }
      return r.ok ? r.json() : null;
    }).then(function (data) {
      if (!data) { return; }
      var live = document.querySelector("[data-updated]");
      if (live) { live.hidden = false; }
      var list = data.tasks || [data];
      var why = "";
      list.forEach(function (t) {
        var row = root.querySelector('[data-task="' + t.id + '"]');
        if (!row) { why = "new task " + t.id; return; }
        var was = row.querySelector('[data-field="state"]');
        if (was && !terminal[was.className.replace(/.*state-/, "")] && terminal[t.state] && data.tasks) {
          why = "task " + t.id + " finished";  // it moves to the finished table
        }
        update(row, t);
        if (t.log) { renderLog(root.querySelector('[data-field="log"]'), t.log); }
        if (!data.tasks && terminal[t.state]) {
          document.querySelectorAll("[data-hide-when-done]").forEach(function (f) { f.hidden = true; });
          if (t.downloadable && !document.getElementById("download")) { why = "result ready"; }
        }
      });
      if (why) { reload(why); }
    }).catch(function () { /* the next tick tries again */ });
  }
  setInterval(tick, 2000);
}());
