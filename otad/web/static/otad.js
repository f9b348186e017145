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

function applyMessage(message) {
  if (message.reload) { window.location.reload(); return; }
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
  connectLive();
  confirmForms();
  uploadForms();
});
