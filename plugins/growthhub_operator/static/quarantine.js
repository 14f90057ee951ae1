// Row selection and the replay request of the quarantine page. No libraries: the page works offline.
(function () {
  "use strict";
  const button = document.getElementById("replay");
  const count = document.getElementById("selected-count");
  const statusLine = document.getElementById("replay-status");
  const all = document.getElementById("select-all");
  const picks = () => Array.from(document.querySelectorAll("input.pick"));
  const chosen = () => picks().filter((box) => box.checked).map((box) => Number(box.value));

  function refresh() {
    const n = chosen().length;
    count.textContent = n + " selected";
    button.disabled = n === 0 || button.dataset.forbidden === "1";
  }

  function say(text, ok) {
    statusLine.textContent = text;
    statusLine.className = ok ? "ok" : "error";
  }

  async function replay() {
    const ids = chosen();
    button.disabled = true;
    say("Queuing a replay of " + ids.length + " row(s)…", true);
    try {
      const response = await fetch("api/replay", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ ids: ids }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        say("Replay refused (" + response.status + "): " + (body.detail || response.statusText), false);
        return;
      }
      const skipped = body.skipped ? ", " + body.skipped + " no longer open" : "";
      say("Replay queued: " + body.dag_id + " run " + body.dag_run_id + " for " + body.rows + " row(s)" + skipped, true);
      picks().filter((box) => box.checked).forEach((box) => {
        box.checked = false;
        box.disabled = true;  // queued: the replay run decides what becomes of the row
        box.closest("tr").classList.add("replayed");
      });
      if (all) all.checked = false;
    } catch (error) {
      say("Replay failed: " + error, false);
    } finally {
      refresh();
    }
  }

  picks().forEach((box) => box.addEventListener("change", refresh));
  if (all) {
    all.addEventListener("change", () => {
      picks().forEach((box) => { box.checked = all.checked; });
      refresh();
    });
  }
  button.addEventListener("click", replay);
  refresh();
})();
