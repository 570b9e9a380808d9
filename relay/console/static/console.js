// The console's live checks and its calls to the JSON API. Plain JavaScript,
// no build step; the pages read without it.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf"]').content;

async function api(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: await response.text() }; }
  return { status: response.status, data };
}

function say(text, isError) {
  const box = document.getElementById("status-message");
  if (!box) return;
  box.textContent = text;
  box.className = isError ? "error" : "";
}

// --- the Add / Edit route dialog ---------------------------------------------

function routeForm() {
  const form = document.getElementById("route-form");
  if (!form) return;
  const single = document.getElementById("kind-single");
  const multiple = document.getElementById("kind-multiple");
  const port465 = form.dataset.port465;
  const ports = form.dataset.ports;

  function showKind() {
    document.getElementById("single-section").hidden = !single.checked;
    document.getElementById("multiple-section").hidden = single.checked;
    check();
  }

  function portProblem(input) {
    const text = input.value.trim();
    if (text === "") return "";
    const port = Number(text);
    if (port === 465) return port465;
    if (!Number.isInteger(port) || !(port === 25 || port === 587 || (port >= 1024 && port <= 65535)))
      return "port " + text + " is not allowed; use " + ports;
    return "";
  }

  function fieldError(field, text) {
    const el = form.querySelector('[data-field="' + field + '"]');
    if (el) el.textContent = text;
  }

  // Live checks: each table's % load sum, and the port rules.
  function check() {
    let ok = true;
    for (const which of ["primary", "secondary"]) {
      const rows = form.querySelectorAll("#" + which + "-table .host-row");
      let sum = 0;
      rows.forEach((row) => { sum += Number(row.querySelector(".load").value || 0); });
      const out = document.getElementById(which + "-sum");
      const refused = rows.length > 0 && sum !== 100 && multiple.checked;
      out.textContent = rows.length ? "total " + sum + " %" : "";
      out.className = "sum" + (refused ? " fail" : "");
      fieldError(which, refused ? "the % load must add up to 100; now " + sum + " %" : "");
      if (refused) ok = false;
    }
    const inputs = single.checked ? [document.getElementById("single-port")]
      : Array.from(form.querySelectorAll("#multiple-section .port"));
    let portText = "";
    inputs.forEach((input) => {
      const problem = portProblem(input);
      input.classList.toggle("invalid", problem !== "");
      if (problem) { portText = problem; ok = false; }
    });
    if (ok) say("");
    if (single.checked) fieldError("port", portText);
    else if (portText) fieldError("primary", (form.querySelector('[data-field="primary"]').textContent + " " + portText).trim());
    return ok;
  }

  function rows(which) {
    return Array.from(form.querySelectorAll("#" + which + "-table .host-row")).map((row) => ({
      host: row.querySelector(".host").value.trim(),
      port: Number(row.querySelector(".port").value),
      load: Number(row.querySelector(".load").value),
    }));
  }

  function collect() {
    const route = {
      name: document.getElementById("route-name").value.trim(),
      single: single.checked,
      mx_lookup: document.getElementById("mx_lookup").checked,
      require_tls: document.getElementById("require_tls").checked,
      require_ca_signed: document.getElementById("require_ca_signed").checked,
      validate_hostname: document.getElementById("validate_hostname").checked,
      on_tls_failure: document.getElementById("on_tls_failure").value,
    };
    if (single.checked) {
      route.host = document.getElementById("single-host").value.trim();
      route.port = Number(document.getElementById("single-port").value);
    } else {
      route.primary = rows("primary");
      route.secondary = rows("secondary");
    }
    if (form.dataset.original) route.original = form.dataset.original;
    return route;
  }

  function showProblems(problems) {
    form.querySelectorAll("[data-field]").forEach((el) => { el.textContent = ""; });
    const other = [];
    for (const [field, messages] of Object.entries(problems.fields || {})) {
      // "primary[2].port" is shown at its table.
      const base = field.split("[")[0].split(".")[0];
      const el = form.querySelector('[data-field="' + base + '"]');
      const text = (base === field ? "" : field + ": ") + messages.join("; ");
      if (el) el.textContent = (el.textContent + " " + text).trim(); else other.push(field + ": " + text);
    }
    document.getElementById("other-problems").textContent = other.concat(problems.other || []).join("\n");
  }

  function addRow(which) {
    const body = form.querySelector("#" + which + "-table tbody");
    const row = document.createElement("tr");
    row.className = "host-row";
    row.innerHTML = '<td><input class="host" aria-label="host"></td>' +
      '<td><input class="port" type="number" value="25" aria-label="port"></td>' +
      '<td><input class="load" type="number" min="1" max="100" aria-label="% load"></td>' +
      '<td><button type="button" class="remove-row">Remove</button></td>';
    body.appendChild(row);
    check();
    return row;
  }

  form.addEventListener("input", check);
  form.addEventListener("change", check);
  single.addEventListener("change", showKind);
  multiple.addEventListener("change", showKind);
  form.addEventListener("click", (event) => {
    const target = event.target;
    if (target.classList.contains("add-row")) addRow(target.closest("table").dataset.table);
    if (target.classList.contains("remove-row")) { target.closest("tr").remove(); check(); }
  });

  document.getElementById("save").addEventListener("click", async () => {
    if (!check()) { say("Fix the fields marked in red first.", true); return; }
    const route = collect();
    const original = form.dataset.original;
    const url = original ? "/api/routes/" + encodeURIComponent(original) : "/api/routes";
    const { status, data } = await api(original ? "PUT" : "POST", url, route);
    if (status === 200 && data.saved) {
      say(data.applied ? "Saved and applied." : "Saved, but the relay did not apply it: see its log.", !data.applied);
      if (data.applied) window.location.href = "/routes";
    } else if (data.problems) {
      showProblems(data.problems);
      say("Not saved: fix the problems shown.", true);
    } else {
      say("Not saved: " + (data.error || status), true);
    }
  });

  document.getElementById("test-tls").addEventListener("click", async () => {
    const results = document.getElementById("tls-results");
    results.textContent = "Testing…";
    const { data } = await api("POST", "/api/routes/test-tls", collect());
    results.textContent = "";
    if (data.problems) { showProblems(data.problems); results.textContent = "Fix the form first."; return; }
    if (data.error) { results.textContent = data.error; return; }
    const head = document.createElement("h2");
    head.textContent = data.passed ? "TLS test: every host passes" : "TLS test: failed";
    head.className = data.passed ? "pass" : "fail";
    results.appendChild(head);
    for (const host of data.hosts) {
      const item = document.createElement("div");
      item.className = "tls-host " + (host.passed ? "pass" : "fail");
      const lines = [host.host + " [" + (host.address || "no address") + "]:" + host.port + " (" + host.table + "): " + (host.passed ? "PASS" : "FAIL")];
      if (host.error) lines.push("error: " + host.error);
      if (host.certificate) {
        lines.push("certificate names: " + (host.certificate.names.join(", ") || "-"));
        lines.push("expires: " + host.certificate.not_after + " (" + host.certificate.days_left + " days left)");
      }
      for (const failure of host.failures) {
        lines.push("failed check " + failure.option + ": " + failure.text);
        lines.push("  " + failure.problem);
        failure.fixes.forEach((fix) => lines.push("  fix: " + fix));
      }
      host.warnings.forEach((w) => lines.push("warning: " + w));
      const pre = document.createElement("pre");
      pre.textContent = lines.join("\n");
      item.appendChild(pre);
      results.appendChild(item);
    }
  });

  const del = document.getElementById("delete-route");
  if (del) del.addEventListener("click", async () => {
    if (!window.confirm("Delete route " + form.dataset.original + "?")) return;
    const { status, data } = await api("DELETE", "/api/routes/" + encodeURIComponent(form.dataset.original));
    if (status === 200) window.location.href = "/routes";
    else if (data.problems) showProblems(data.problems);
    else say(data.error || String(status), true);
  });
  showKind();
}

// --- rules ----------------------------------------------------------------------

function rulesPage() {
  const table = document.getElementById("rules");
  if (!table) return;
  const current = () => Array.from(table.querySelectorAll(".rule-row")).map((row) => ({
    recipients: row.dataset.recipients.split(" ").filter(Boolean),
    route: row.dataset.route,
  }));
  async function save(rules) {
    const { status, data } = await api("PUT", "/api/rules", { rules });
    if (status === 200) { window.location.reload(); return; }
    const problems = data.problems ? Object.values(data.problems.fields).flat().concat(data.problems.other) : [data.error];
    document.getElementById("rules-problems").textContent = problems.join("\n");
  }
  table.addEventListener("click", (event) => {
    const row = event.target.closest(".rule-row");
    if (!row) return;
    const rules = current();
    const i = Array.from(table.querySelectorAll(".rule-row")).indexOf(row);
    if (event.target.classList.contains("rule-up") && i > 0) [rules[i - 1], rules[i]] = [rules[i], rules[i - 1]];
    else if (event.target.classList.contains("rule-down") && i < rules.length - 1) [rules[i + 1], rules[i]] = [rules[i], rules[i + 1]];
    else if (event.target.classList.contains("rule-delete")) { if (!window.confirm("Delete this rule?")) return; rules.splice(i, 1); }
    else return;
    save(rules);
  });
  document.getElementById("rule-add-button").addEventListener("click", () => {
    const recipients = document.getElementById("rule-recipients").value.split(/\s+/).filter(Boolean);
    save(current().concat([{ recipients, route: document.getElementById("rule-route").value }]));
  });
}

// --- queue ----------------------------------------------------------------------

function queuePage() {
  document.querySelectorAll(".queue-action").forEach((button) => {
    button.addEventListener("click", async () => {
      const ids = Array.from(document.querySelectorAll(".pick:checked")).map((box) => box.value);
      const action = button.dataset.action;
      if (!ids.length) { say("Select messages first.", true); return; }
      const body = { ids };
      if (action === "delete") {
        if (!window.confirm("Delete " + ids.length + " message(s)? This cannot be undone.")) return;
        body.confirm = true;
      }
      const { status, data } = await api("POST", "/api/queue/" + action, body);
      if (status === 200) { say(action + ": " + data.done.length + " message(s)"); window.setTimeout(() => window.location.reload(), 800); }
      else say(data.error || String(status), true);
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".noscript-hint").forEach((el) => { el.hidden = true; });
  routeForm();
  rulesPage();
  queuePage();
});
