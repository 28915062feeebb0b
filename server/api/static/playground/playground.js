// The playground: a form for each fal endpoint, built from this server's /openapi.json;
// requests go through fal's queue API, progress comes from its status stream. Everything
// stays in this browser (API key, history) and talks to this server only.
"use strict";

const KEY_STORAGE = "flux-server.api-key";
const HISTORY_STORAGE = "flux-server.history";
const HISTORY_SIZE = 50;
const state = { schema: null, endpoints: new Map(), fields: [], running: null };
const $ = (id) => document.getElementById(id);

// --- schema -------------------------------------------------------------------------------

function resolve(schema) {
  while (schema && schema.$ref) {
    schema = state.schema.components.schemas[schema.$ref.split("/").pop()];
  }
  return schema || {};
}

async function loadEndpoints() {
  const response = await fetch("/openapi.json");
  state.schema = await response.json();
  for (const [path, item] of Object.entries(state.schema.paths)) {
    const operation = item.post;
    // Endpoints whose checkpoint this server does not serve would only answer 404.
    const served = operation && operation["x-flux-variant-served"] !== false;
    if (served && (operation.operationId || "").startsWith("fal_submit_")) {
      const input = resolve(operation.requestBody.content["application/json"].schema);
      state.endpoints.set(path.slice(1), { operation, input });
    }
  }
  const select = $("endpoint");
  for (const [id, { operation }] of state.endpoints) {
    select.append(new Option(`${id} (${operation.summary.split(" (")[0].replace("Queue a ", "")})`, id));
  }
  select.addEventListener("change", () => buildForm(select.value));
  buildForm(select.value);
}

// --- the form -----------------------------------------------------------------------------

function variants(property) {
  const items = property.anyOf ? property.anyOf : [property];
  const enums = items.filter((item) => item.enum).flatMap((item) => item.enum);
  const object = items.map(resolve).find((item) => item.type === "object" && item.properties);
  const nullable = items.some((item) => item.type === "null");
  const base = items.map(resolve).find((item) => item.type && item.type !== "null") || {};
  return { enums, object, nullable, base };
}

function limits(input, schema) {
  const integer = schema.type === "integer";
  if (schema.minimum !== undefined) input.min = schema.minimum;
  if (schema.exclusiveMinimum !== undefined) input.min = schema.exclusiveMinimum + (integer ? 1 : 0);
  if (schema.maximum !== undefined) input.max = schema.maximum;
  if (schema.exclusiveMaximum !== undefined) input.max = schema.exclusiveMaximum - (integer ? 1 : 0);
  input.step = integer ? "1" : "any";
}

function fieldControl(name, property, required) {
  const { enums, object, nullable, base } = variants(property);
  const wrapper = document.createElement("div");
  wrapper.className = "field";
  wrapper.dataset.field = name;
  const label = document.createElement("label");
  label.textContent = (property.title || name) + (required ? " *" : "");
  wrapper.append(label);
  let read;
  if (enums.length && object) {
    // A preset or explicit sides (image_size): a select with "custom" revealing the sides.
    const select = document.createElement("select");
    select.name = name;
    for (const value of enums) select.append(new Option(value, value));
    select.append(new Option("custom", "custom"));
    select.value = property.default ?? enums[0];
    const sides = document.createElement("div");
    sides.className = "inline";
    const inputs = {};
    for (const [side, sideSchema] of Object.entries(object.properties)) {
      const input = document.createElement("input");
      input.type = "number";
      input.name = `${name}.${side}`;
      input.placeholder = side;
      input.value = sideSchema.default ?? "";
      limits(input, sideSchema);
      inputs[side] = input;
      sides.append(input);
    }
    sides.hidden = true;
    select.addEventListener("change", () => (sides.hidden = select.value !== "custom"));
    label.append(select);
    wrapper.append(sides);
    read = () =>
      select.value === "custom"
        ? Object.fromEntries(Object.entries(inputs).map(([side, input]) => [side, Number(input.value)]))
        : select.value;
  } else if (enums.length) {
    const select = document.createElement("select");
    select.name = name;
    if (nullable) select.append(new Option("(server default)", ""));
    for (const value of enums) select.append(new Option(value, value));
    select.value = property.default ?? "";
    label.append(select);
    read = () => (select.value === "" ? undefined : select.value);
  } else if (base.type === "boolean") {
    const input = document.createElement("input");
    input.type = "checkbox";
    input.name = name;
    input.checked = Boolean(property.default);
    label.prepend(input);
    label.classList.add("inline");
    read = () => input.checked;
  } else if (base.type === "integer" || base.type === "number") {
    const input = document.createElement("input");
    input.type = "number";
    input.name = name;
    limits(input, base);
    input.value = property.default ?? "";
    if (property.default === null || property.default === undefined) input.placeholder = "random";
    label.append(input);
    read = () => (input.value === "" ? undefined : Number(input.value));
  } else if (name.endsWith("_url")) {
    // An image: a URL the server can fetch, or a file from this computer (sent as a data URI).
    const input = document.createElement("input");
    input.type = "text";
    input.name = name;
    input.placeholder = "https://… or choose a file";
    const file = document.createElement("input");
    file.type = "file";
    file.accept = "image/*";
    file.name = `${name}.file`;
    file.addEventListener("change", () => {
      const reader = new FileReader();
      reader.onload = () => {
        input.value = reader.result;
        refreshSnippet();
      };
      if (file.files[0]) reader.readAsDataURL(file.files[0]);
    });
    label.append(input, file);
    read = () => (input.value === "" ? undefined : input.value);
  } else {
    const input = name.includes("prompt") ? document.createElement("textarea") : document.createElement("input");
    input.name = name;
    input.value = property.default ?? "";
    label.append(input);
    read = () => (input.value === "" ? undefined : input.value);
  }
  if (property.description) {
    const hint = document.createElement("div");
    hint.className = "hint";
    hint.textContent = property.description;
    wrapper.append(hint);
  }
  const error = document.createElement("div");
  error.className = "error";
  error.setAttribute("role", "alert");
  wrapper.append(error);
  return { name, wrapper, read, error };
}

function buildForm(endpoint) {
  const { input } = state.endpoints.get(endpoint);
  const required = new Set(input.required || []);
  const container = $("fields");
  container.replaceChildren();
  state.fields = Object.entries(input.properties).map(([name, property]) =>
    fieldControl(name, property, required.has(name)),
  );
  // The prompt first: it is what an artist changes most.
  state.fields.sort((a, b) => (b.name === "prompt") - (a.name === "prompt"));
  for (const field of state.fields) container.append(field.wrapper);
  refreshSnippet();
}

function collect() {
  const body = {};
  for (const field of state.fields) {
    const value = field.read();
    if (value !== undefined) body[field.name] = value;
  }
  return body;
}

function clearErrors() {
  for (const field of state.fields) field.error.textContent = "";
  $("form-error").textContent = "";
}

function showValidation(detail) {
  const errors = Array.isArray(detail) ? detail : [{ loc: [], msg: String(detail) }];
  for (const error of errors) {
    const loc = error.loc || [];
    const field = state.fields.find((item) => loc[0] === "body" && item.name === loc[1]);
    const target = field ? field.error : $("form-error");
    target.textContent = (target.textContent ? target.textContent + " " : "") + error.msg;
  }
}

// --- requests -----------------------------------------------------------------------------

function headers(json = true) {
  const result = json ? { "content-type": "application/json" } : {};
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) result.authorization = `Key ${key}`;
  return result;
}

function setStatus(text, progress) {
  $("status").textContent = text;
  if (progress !== undefined) $("progress").value = progress;
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  const endpoint = $("endpoint").value;
  const body = collect();
  let response;
  try {
    response = await fetch(`/${endpoint}`, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (error) {
    $("form-error").textContent = `The server cannot be reached: ${error}`;
    return;
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 422) showValidation(answer.detail);
    else $("form-error").textContent = `${response.status}: ${answer.detail || response.statusText}`;
    return;
  }
  state.running = answer;
  $("cancel").disabled = false;
  $("images").replaceChildren();
  remember({ id: answer.request_id, endpoint, prompt: body.prompt || "", at: Date.now(), status: "IN_QUEUE" });
  setStatus(`Queued (position ${answer.queue_position})`, 0);
  try {
    await follow(answer);
  } catch (error) {
    setStatus(`Lost the status stream: ${error}`);
  } finally {
    $("cancel").disabled = true;
    state.running = null;
  }
}

async function follow(submitted) {
  // fetch, not EventSource: EventSource cannot send the API key.
  const response = await fetch(`${submitted.status_url}/stream?logs=1`, { headers: headers(false) });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (line.startsWith("data: ")) await onStatus(submitted, JSON.parse(line.slice(6)));
      }
    }
  }
}

async function onStatus(submitted, status) {
  if (status.status === "IN_QUEUE") {
    setStatus(`Queued (position ${status.queue_position})`, 0);
    return;
  }
  if (status.status === "IN_PROGRESS") {
    const steps = (status.logs || []).map((entry) => /step (\d+)\/(\d+)/.exec(entry.message)).filter(Boolean);
    const last = steps[steps.length - 1];
    setStatus(last ? `Running: step ${last[1]} of ${last[2]}` : "Running", last ? last[1] / last[2] : 0);
    return;
  }
  if (status.error) {
    setStatus(`Failed: ${status.error} (${status.error_type})`, 0);
    remember({ id: status.request_id, status: status.error_type });
    return;
  }
  const result = await fetch(submitted.response_url, { headers: headers(false) }).then((r) => r.json());
  const urls = (result.images || []).map((image) => image.url);
  for (const url of urls) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = result.prompt || "generated image";
    $("images").append(img);
  }
  setStatus(`Done: ${urls.length} image(s), seed ${result.seed}`, 1);
  remember({ id: status.request_id, status: "COMPLETED", images: urls });
}

async function cancel() {
  if (!state.running) return;
  setStatus("Cancelling…");
  await fetch(state.running.cancel_url, { method: "PUT", headers: headers(false) });
}

// --- history (this browser only) ----------------------------------------------------------

function history() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_STORAGE)) || [];
  } catch {
    return [];
  }
}

function remember(entry) {
  const entries = history();
  const found = entries.find((item) => item.id === entry.id);
  if (found) Object.assign(found, entry);
  else entries.unshift(entry);
  localStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries.slice(0, HISTORY_SIZE)));
  showHistory();
}

function showHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const entry of history()) {
    const item = document.createElement("li");
    item.dataset.requestId = entry.id;
    item.textContent = `${new Date(entry.at).toLocaleString()} · ${entry.endpoint} · ${entry.status} · ${entry.prompt}`;
    for (const url of entry.images || []) {
      const link = document.createElement("a");
      link.href = url;
      link.textContent = " image";
      item.append(link);
    }
    list.append(item);
  }
}

// --- the request as code ------------------------------------------------------------------

function python(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = indent + "    ";
  if (Array.isArray(value)) return `[${value.map((item) => python(item, inner)).join(", ")}]`;
  const items = Object.entries(value).map(([key, item]) => `${inner}${JSON.stringify(key)}: ${python(item, inner)},`);
  return `{\n${items.join("\n")}\n${indent}}`;
}

function snippets() {
  const endpoint = $("endpoint").value;
  const body = collect();
  const origin = window.location.origin;
  const json = JSON.stringify(body, null, 2);
  return {
    curl:
      `curl -X POST "${origin}/${endpoint}" \\\n  -H "Authorization: Key $FAL_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(body).replaceAll("'", "'\\''")}'`,
    python:
      `# FAL_QUEUE_RUN_HOST=${window.location.host} FAL_KEY=<key> (SSL_CERT_FILE=<CA bundle> for a private CA)\n` +
      `import fal_client\n\nresult = fal_client.subscribe(\n    "${endpoint}",\n    arguments=${python(body, "    ")},\n` +
      `    with_logs=True,\n)\nprint(result["images"][0]["url"])`,
    javascript:
      `import { fal } from "@fal-ai/client";\n\n` +
      `fal.config({ credentials: "<key>", proxyUrl: { url: "${origin}/api/fal/proxy", when: "always" } });\n` +
      `const result = await fal.subscribe("${endpoint}", { input: ${json.replaceAll("\n", "\n  ")}, logs: true });\n` +
      `console.log(result.data.images[0].url);`,
  };
}

let shownSnippet = "curl";

function refreshSnippet() {
  $("snippet").textContent = snippets()[shownSnippet];
  $("snippet").dataset.kind = shownSnippet;
}

async function copy(kind) {
  shownSnippet = kind;
  refreshSnippet();
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (plain http on a LAN address): select it for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents($("snippet"));
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
  }
}

// --- start --------------------------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => localStorage.setItem(KEY_STORAGE, key.value.trim()));
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", refreshSnippet);
  $("form").addEventListener("change", refreshSnippet);
  $("cancel").addEventListener("click", cancel);
  $("clear-history").addEventListener("click", () => {
    localStorage.removeItem(HISTORY_STORAGE);
    showHistory();
  });
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", () => copy(button.dataset.copy));
  }
  showHistory();
  loadEndpoints().catch((error) => ($("form-error").textContent = `Cannot read /openapi.json: ${error}`));
}

start();
