// A job: live progress and the timeline of its Responses (server-sent events), cancel and retry.
"use strict";

(() => {
  const { el } = ajs;
  const id = new URLSearchParams(location.search).get("id") || "";
  let job = null;
  let lastSequence = 0; // the newest Response in the timeline
  let shownSequence = 0; // the newest Response the header shows: older news never replaces it
  let source = null;

  function setText(elementId, text) {
    document.getElementById(elementId).textContent = text;
  }

  function showState(state, fraction, message) {
    const badge = document.getElementById("job-state");
    badge.className = "badge " + state;
    badge.textContent = state;
    ajs.setBar(document.getElementById("job-progress"), state, fraction);
    setText("progress-percent", Math.round(fraction * 100) + "%");
    if (message !== undefined) setText("progress-message", message);
    const final = ["FINISHED", "FAILED", "CANCELLED"].includes(state);
    document.getElementById("cancel-button").disabled = final || (job && job.cancel_requested);
    document.getElementById("retry-button").disabled = !(state === "FAILED" || state === "CANCELLED");
  }

  function showError(error) {
    const box = document.getElementById("job-error");
    box.hidden = !error;
    box.textContent = error ? error.code + ": " + error.message : "";
  }

  function detail(list, name, value) {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) return;
    list.append(el("dt", { text: name }), el("dd", {}, value instanceof Node ? value : String(value)));
  }

  function showJob(current) {
    // A reply (of cancel, say) may arrive after the stream has shown newer Responses.
    if (current.last.sequence < shownSequence) return;
    shownSequence = current.last.sequence;
    job = current;
    document.title = "Job " + current.id + " · ajs dashboard";
    setText("job-id", current.id);
    setText("job-type", current.type);
    const progress = current.last && current.last.progress;
    showState(current.state, ajs.fractionOf(current), progress ? progress.message : "");
    showError(current.last && current.last.error);
    const list = document.getElementById("job-details");
    list.replaceChildren();
    detail(list, "Type", current.type);
    detail(list, "State", current.state + (current.cancel_requested && !current.final ? " (cancel requested)" : ""));
    detail(list, "Attempt", current.attempt + " of " + current.max_attempts);
    detail(list, "Creator", current.creator);
    detail(list, "Queue", current.queue);
    detail(list, "Priority", current.priority);
    detail(list, "Submitted", ajs.when(current.create_time));
    detail(list, "Updated", ajs.when(current.update_time));
    detail(list, "Run after", ajs.when(current.run_after));
    detail(list, "Expires", ajs.when(current.expire_time));
    if (current.parent_id) detail(list, "Parent", el("a", { href: ajs.jobHref(current.parent_id), text: current.parent_id }));
    if (current.depends_on.length) {
      const links = el("span", {});
      current.depends_on.forEach((dep, i) => {
        if (i) links.append(", ");
        links.append(el("a", { href: ajs.jobHref(dep), text: dep }));
      });
      detail(list, "Depends on", links);
    }
    if (current.input_type) {
      const input = el("span", {}, el("span", { class: "muted", text: current.input_type }));
      if (current.input !== null) input.append(el("pre", { class: "json", id: "job-input", text: JSON.stringify(current.input, null, 2) }));
      detail(list, "Input", input);
    }
    const output = current.last && current.last.output_type ? current.last : null;
    if (output) {
      const shown = el("span", {}, el("span", { class: "muted", text: output.output_type }));
      if (output.output !== null) shown.append(el("pre", { class: "json", id: "job-output", text: JSON.stringify(output.output, null, 2) }));
      detail(list, "Output", shown);
    }
    detail(list, "Children", el("a", { href: "/jobs?parent=" + encodeURIComponent(current.id), text: "list" }));
    const entries = Object.entries(current.data).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    document.querySelector("#job-data tbody").replaceChildren(
      ...entries.map(([key, value]) => el("tr", {}, el("td", { text: key }), el("td", { text: value }))),
    );
    document.getElementById("job-data-empty").hidden = entries.length > 0;
  }

  function noteOf(response) {
    const note = el("span", { class: "note" });
    if (response.progress && response.progress.message) note.append(response.progress.message);
    if (response.error) note.append(el("span", { class: "err", text: response.error.code + ": " + response.error.message }));
    const data = Object.entries(response.data);
    if (data.length) note.append(el("code", { text: " " + data.map(([k, v]) => k + "=" + v).join(" ") }));
    if (response.output_type) {
      note.append(el("span", { class: "muted", text: " output " + response.output_type + " " }));
      if (response.output !== null) note.append(el("code", { text: JSON.stringify(response.output) }));
    }
    return note;
  }

  function onResponse(response) {
    if (response.sequence <= lastSequence) return;
    lastSequence = response.sequence;
    const fraction = response.state === "FINISHED" ? 1 : response.progress ? response.progress.fraction : 0;
    const body = document.querySelector("#timeline tbody");
    body.append(el("tr", { "data-sequence": response.sequence },
      el("td", { class: "num", text: response.sequence }),
      el("td", { title: response.time || "", text: ajs.when(response.time) }),
      el("td", {}, ajs.badge(response.state)),
      el("td", { class: "num", text: response.progress ? Math.round(response.progress.fraction * 100) + "%" : "" }),
      el("td", {}, noteOf(response)),
    ));
    if (response.sequence < shownSequence) return;
    shownSequence = response.sequence;
    if (job) job.state = response.state;
    showState(response.state, fraction, response.progress ? response.progress.message : undefined);
    showError(response.error);
  }

  function follow() {
    if (source) source.close();
    setText("stream-status", "Live");
    source = new EventSource("/api/events/job?id=" + encodeURIComponent(id) + "&after=" + lastSequence);
    source.addEventListener("job", (event) => showJob(JSON.parse(event.data)));
    source.addEventListener("response", (event) => onResponse(JSON.parse(event.data)));
    source.addEventListener("end", () => {
      source.close();
      setText("stream-status", "Ended: the job has its final Response.");
    });
    source.addEventListener("problem", (event) => {
      source.close();
      setText("stream-status", "Stream stopped: " + JSON.parse(event.data).message);
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) loadOnce();
      else setText("stream-status", "Reconnecting…");
    });
  }

  async function loadOnce() {
    try {
      showJob(await ajs.api("/api/job?id=" + encodeURIComponent(id)));
      setText("stream-status", "");
    } catch (error) {
      setText("job-id", id);
      showError({ code: error.code, message: error.message });
      setText("stream-status", "");
    }
  }

  async function act(action) {
    try {
      showJob(await ajs.api("/api/job/" + action + "?id=" + encodeURIComponent(id), { method: "POST" }));
      if (action === "retry") follow();
    } catch (error) {
      showError({ code: error.code, message: error.message });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("cancel-button").addEventListener("click", () => act("cancel"));
    document.getElementById("retry-button").addEventListener("click", () => act("retry"));
    follow();
  });
})();
