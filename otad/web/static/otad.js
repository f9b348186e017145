// otad dashboard: live updates over server-sent events, confirmations and upload progress.
// No framework, no build step; every page works without this file, only less live.
"use strict";

function onReady(fn) {
  if (document.readyState !== "loading") fn(); else document.addEventListener("DOMContentLoaded", fn);
}

function each(selector, fn, root) {
  (root || document).querySelectorAll(selector).forEach(fn);
}

function byData(name, value) {
  return document.querySelectorAll("[data-" + name + "=\"" + CSS.escape(String(value)) + "\"]");
}

function setField(root, field, text) {
  each("[data-field=\"" + field + "\"]", function (el) {
    el.textContent = text;
    if (el.dataset.stateClass !== undefined) el.className = "state state-" + text;
  }, root);
}

// A form sent from this page is already taking the browser to its answer: a reload now would
// race that redirect and leave the page on its old URL (and notice).
let leaving = false;
document.addEventListener("submit", function (event) { if (!event.defaultPrevented) leaving = true; });
function reloadUnlessLeaving() {
  if (!leaving) window.location.reload();
}

function applyMessage(message) {
  if (message.reload) { reloadUnlessLeaving(); return; }
  Object.entries(message.upgrades || {}).forEach(function ([version, change]) {
    byData("upgrade", version).forEach(function (row) { setField(row, "state", change.state); });
  });
  Object.entries(message.devices || {}).forEach(function ([name, online]) {
    byData("device", name).forEach(function (row) { setField(row, "online", online ? "online" : "offline"); });
  });
  const summary = message.summary || {};
  each("[data-summary]", function (el) {
    let value = summary;
    el.dataset.summary.split(".").forEach(function (key) { value = value === undefined ? undefined : value[key]; });
    if (value !== undefined && typeof value !== "object") el.textContent = value;
  });
  Object.entries(summary.products || {}).forEach(function ([product, counts]) {
    byData("product", product).forEach(function (row) {
      setField(row, "devices", counts.devices);
      setField(row, "online", counts.online);
    });
  });
  Object.entries(message.campaigns || {}).forEach(function ([id, progress]) {
    byData("campaign", id).forEach(function (box) { applyCampaign(box, progress); });
  });
}

function applyCampaign(box, progress) {
  const updated = progress.states.updated || 0;
  setField(box, "state", progress.state);
  setField(box, "stage", progress.stage);
  each("[data-field=\"progress\"]", function (bar) { bar.max = progress.devices; bar.value = updated; }, box);
  setField(box, "progress-text", updated + " of " + progress.devices + " updated");
  each("[data-campaign-state]", function (cell) {
    cell.textContent = progress.states[cell.dataset.campaignState] || 0;
  }, box);
  progress.stages.forEach(function (stage, index) {
    each("[data-stage=\"" + (index + 1) + "\"]", function (row) {
      each("[data-stage-state]", function (cell) {
        cell.textContent = stage.states[cell.dataset.stageState] || 0;
      }, row);
      each("[data-stage-devices]", function (cell) { cell.textContent = stage.devices; }, row);
    }, box);
  });
  box.dispatchEvent(new CustomEvent("otad:campaign", { detail: progress }));
}

// Campaign page (campaign.html): the sums and rates beside applyCampaign's cells, from the same
// message and counted as the server counts them; a change of state reloads the page, since its
// buttons and the reason it paused come with the state.
function percentText(part, whole) {
  return whole ? (100 * part / whole).toFixed(1) + "%" : "\u2013";
}

function sumStates(states, names) {
  return names.reduce(function (total, name) { return total + (states[name] || 0); }, 0);
}

function campaignRates() {
  const FAILED = ["failed", "timed_out"];
  each("[data-campaign-rates]", function (box) {
    box.addEventListener("otad:campaign", function (event) {
      const progress = event.detail;
      if (progress.state !== box.dataset.campaignRates) { reloadUnlessLeaving(); return; }
      const standing = { opened: 0, failed: 0, updated: 0 };
      progress.stages.forEach(function (stage, index) {
        const failed = sumStates(stage.states, FAILED);
        const updated = stage.states.updated || 0;
        if (index < progress.stage) {
          standing.opened += stage.devices; standing.failed += failed; standing.updated += updated;
        }
        each("[data-stage=\"" + (index + 1) + "\"]", function (row) {
          each("[data-stage-sum]", function (cell) {
            cell.textContent = sumStates(stage.states, cell.dataset.stageSum.split(" "));
          }, row);
          const told = sumStates(stage.states, Object.keys(stage.states));
          each("[data-stage-unstarted]", function (cell) { cell.textContent = Math.max(0, stage.devices - told); }, row);
          each("[data-stage-phase]", function (cell) { cell.textContent = index < progress.stage ? "open" : "waiting"; }, row);
          each("[data-stage-rate=\"success\"]", function (cell) { cell.textContent = percentText(updated, updated + failed); }, row);
          each("[data-stage-rate=\"failure\"]", function (cell) { cell.textContent = percentText(failed, stage.devices); }, row);
        }, box);
      });
      standing.failed = Math.max(0, standing.failed - Number(box.dataset.failuresAccepted || 0));
      const ended = standing.failed + standing.updated;
      const shown = { failed: standing.failed, opened: standing.opened, ended: ended,
                      "failure-rate": percentText(standing.failed, standing.opened),
                      "success-rate": percentText(standing.updated, ended) };
      each("[data-standing]", function (cell) { cell.textContent = shown[cell.dataset.standing]; }, box);
    });
  });
}

function connectLive() {
  const url = document.body.dataset.live;
  const status = document.getElementById("live-status");
  if (!url || !window.EventSource) return;
  const source = new EventSource(url);
  source.onopen = function () { if (status) status.textContent = "live"; };
  source.onerror = function () { if (status) status.textContent = "live: reconnecting"; };
  source.onmessage = function (event) { applyMessage(JSON.parse(event.data)); };
  window.addEventListener("pagehide", function () { source.close(); });
}

// <form data-confirm="Delete package fw?">: asks before sending.
function confirmForms() {
  each("form[data-confirm]", function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
}

// <form data-upload> with a <progress data-upload-progress>: sends with XMLHttpRequest to show
// the bytes sent, then follows the server's answer like a normal form would.
function uploadForms() {
  each("form[data-upload]", function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      leaving = true;  // a reload would cut the upload off
      const bar = form.querySelector("[data-upload-progress]");
      const text = form.querySelector("[data-upload-status]");
      const request = new XMLHttpRequest();
      request.open("POST", form.action);
      request.setRequestHeader("X-CSRF-Token", form.elements.csrf.value);
      request.upload.onprogress = function (e) {
        if (!e.lengthComputable) return;
        if (bar) { bar.hidden = false; bar.max = e.total; bar.value = e.loaded; }
        if (text) text.textContent = "Uploading: " + Math.round(100 * e.loaded / e.total) + "%";
      };
      request.onload = function () {
        if (request.responseURL && request.status < 400) { window.location.assign(request.responseURL); return; }
        document.open(); document.write(request.responseText); document.close();
      };
      request.onerror = function () { if (text) text.textContent = "Upload failed: the connection was lost."; };
      if (text) text.textContent = "Uploading…";
      request.send(new FormData(form));
    });
  });
}

onReady(function () {
  campaignRates();
  connectLive();
  confirmForms();
  uploadForms();
});
