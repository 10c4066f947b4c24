// pyisr dashboard: filter the table's rows as you type, apply a chosen state or sort at once.
// Plain script, loaded from the dashboard's own origin (the Content-Security-Policy allows
// no other); the page works without it.
(function () {
  "use strict";

  var input = document.getElementById("filter-q");
  var table = document.getElementById("entries");
  if (input && table && table.tBodies.length) {
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var none = document.getElementById("filter-none");
    input.addEventListener("input", function () {
      var needle = input.value.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (row) {
        var text = (row.getAttribute("data-search") || "").toLowerCase();
        row.hidden = needle !== "" && text.indexOf(needle) === -1;
        if (!row.hidden) {
          shown += 1;
        }
      });
      if (none) {
        none.hidden = shown > 0;
      }
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("select[data-autosubmit]"), function (select) {
    select.addEventListener("change", function () {
      select.form.submit();
    });
  });

  // The target box says what it expects for the chosen action.
  var kind = document.getElementById("action-kind");
  var target = document.getElementById("action-target");
  if (kind && target) {
    var hints = {
      path: "/blog/1",
      page: "/blog/[id]",
      layout: "/blog",
      tag: "posts",
      regenerate: "/blog/1"
    };
    var update = function () {
      target.placeholder = hints[kind.value] || "";
    };
    kind.addEventListener("change", update);
    update();
  }
})();
