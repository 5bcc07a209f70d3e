// A new job: upload a JSONL file (the API checks every line and names the first bad one), then
// create a job with the common fields. The request is shown as curl and Python as it is edited.
// A preference file trains with DPO (OpenAI's method {"type": "dpo"}), any other supervised.

import { api, send } from "../api.js";
import { h, replace } from "../dom.js";
import { curlSnippet, pythonSnippet } from "../snippets.js";

const MAX_SHOWN_LINE = 400;

// The training methods (OpenAI's method.type): the file record format that picks each, and what
// learning_rate_multiplier multiplies for it (shared/methods.py).
const METHODS = {
  supervised: { label: "Supervised", recordFormat: null, baseRate: "2e-4" },
  dpo: { label: "DPO (preference pairs)", recordFormat: "preference", baseRate: "1e-4" },
};
// TRL's DPO losses (shared/schemas.py LossType); the first is the API's default.
const LOSS_TYPES = [["sigmoid", "sigmoid (the DPO paper's)"], ["ipo", "ipo"],
  ["hinge", "hinge"], ["sigmoid_norm", "sigmoid_norm (length-normalised)"]];

function field(id, label, input, help) {
  input.id = id;
  input.name = id;
  if (help) input.setAttribute("aria-describedby", `${id}-help`);
  return h("div", { class: "field" }, h("label", { for: id }, label), input,
    help ? h("p", { class: "help", id: `${id}-help` }, help) : null);
}

function numberInput(value, attrs = {}) {
  return h("input", { type: "number", value, inputmode: "decimal", ...attrs });
}

/** The line a validation message names ("… line 3: …"), read from the file itself. */
async function badLine(file, message) {
  const match = /\bline (\d+)\b/i.exec(message);
  if (!match) return null;
  const number = Number(match[1]);
  const lines = (await file.text()).split(/\r?\n/);
  if (number < 1 || number > lines.length) return null;
  const text = lines[number - 1];
  return { number, text: text.length > MAX_SHOWN_LINE ? `${text.slice(0, MAX_SHOWN_LINE)}…` : text };
}

function copyButton(target) {
  return h("button", {
    type: "button", class: "secondary small",
    onclick: async (event) => {
      const btn = event.currentTarget;
      try {
        await navigator.clipboard.writeText(target.textContent);
        btn.textContent = "Copied";
      } catch {
        // No clipboard (a page not on localhost or https): select the text for Ctrl-C.
        const range = document.createRange();
        range.selectNodeContents(target);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        btn.textContent = "Selected: press Ctrl-C";
      }
      setTimeout(() => { btn.textContent = "Copy"; }, 2000);
    },
  }, "Copy");
}

export function newJobView(root) {
  // --- upload -----------------------------------------------------------------------------
  const fileInput = h("input", { type: "file", accept: ".jsonl,.json,application/jsonl" });
  const uploadButton = h("button", { type: "submit" }, "Upload");
  const uploadResult = h("div", { id: "upload-result", role: "status" });
  const uploadForm = h("form", { class: "card", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "1. Upload training data"),
    field("upload-file", "JSONL file", fileInput,
      "One JSON object per line: {\"prompt\", \"completion\"}, {\"messages\": [...]}, " +
      "{\"instruction\", \"response\"}, {\"dialogue\", \"summary\"}, or preference pairs " +
      "{\"input\", \"preferred_output\", \"non_preferred_output\"} for DPO. " +
      "Every line is checked."),
    uploadButton, uploadResult);

  // --- job form ---------------------------------------------------------------------------
  const model = h("input", { type: "text", required: true, list: "model-choices",
    autocomplete: "off", spellcheck: "false" });
  const modelChoices = h("datalist", { id: "model-choices" });
  const trainingFile = h("select", { required: true });
  const validationFile = h("select");
  const method = h("select", {}, Object.entries(METHODS).map(([value, m]) =>
    h("option", { value }, m.label)));
  const beta = numberInput("", { min: 0.001, max: 100, step: "any", placeholder: "auto" });
  const lossType = h("select", {}, LOSS_TYPES.map(([value, label]) =>
    h("option", { value }, label)));
  const suffix = h("input", { type: "text", maxlength: 64, pattern: "[A-Za-z0-9_\\-]*",
    autocomplete: "off" });
  const schedule = h("select", {}, h("option", { value: "epochs" }, "Epochs"),
    h("option", { value: "steps" }, "Steps"));
  const length = numberInput(1, { min: 0.01, step: "any", required: true });
  const lengthLabel = h("label", { for: "length" }, "Number of epochs");
  const batchSize = numberInput(4, { min: 1, max: 1024, step: 1, required: true });
  const lrMultiplier = numberInput(1, { min: 0.001, max: 100, step: "any", required: true });
  const loraR = numberInput(8, { min: 1, step: 1, required: true });
  const loraAlpha = numberInput(16, { min: 0.001, step: "any", required: true });
  const promptFormat = h("select", {},
    h("option", { value: "dolly" }, "dolly (Alpaca/Dolly layout)"),
    h("option", { value: "phi2-qa" }, "phi2-qa (Instruct: … Output: …)"),
    h("option", { value: "chat" }, "chat (the tokenizer's chat template)"));
  const saveSteps = numberInput(50, { min: 1, step: 1 });
  const loggingSteps = numberInput(10, { min: 1, step: 1 });
  const maxLength = numberInput(512, { min: 16, step: 1 });
  const seed = numberInput("", { min: 0, step: 1, placeholder: "random" });
  const createButton = h("button", { type: "submit" }, "Create job");
  const createError = h("p", { class: "error", role: "alert", id: "create-error" });
  length.id = "length";
  length.name = "length";
  const curl = h("pre", { class: "snippet", id: "snippet-curl", tabindex: "0" });
  const python = h("pre", { class: "snippet", id: "snippet-python", tabindex: "0" });

  const jobForm = h("form", { class: "card", "aria-labelledby": "create-title", novalidate: true },
    h("h2", { id: "create-title" }, "2. Create a job"),
    h("div", { class: "grid" },
      field("model", "Base model", model,
        "A Hugging Face id or a model folder under the operator's LORAFLEET_MODELS_DIR."),
      modelChoices,
      field("training-file", "Training file", trainingFile),
      field("validation-file", "Validation file", validationFile,
        "Optional: validation loss at every checkpoint."),
      field("method", "Method", method,
        "DPO learns from preference pairs: a preference file selects it."),
      field("suffix", "Suffix", suffix, "Part of the fine-tuned model's name (A-Z a-z 0-9 _ -)."),
      field("schedule", "Train for", schedule),
      h("div", { class: "field" }, lengthLabel, length),
      field("batch-size", "Batch size", batchSize),
      field("lr-multiplier", "Learning rate multiplier", lrMultiplier, "× 2e-4."),
      field("beta", "Beta", beta,
        "How far the adapter may move from its reference model (lower: further). " +
        "Empty: auto."),
      field("lora-r", "LoRA rank (r)", loraR),
      field("lora-alpha", "LoRA alpha", loraAlpha, "The update is scaled by alpha / r."),
      field("prompt-format", "Prompt format", promptFormat,
        "Stored with the adapter: inference wraps prompts the same way.")),
    h("details", {}, h("summary", {}, "More settings"), h("div", { class: "grid" },
      field("save-steps", "Checkpoint every (steps)", saveSteps),
      field("logging-steps", "Log the loss every (steps)", loggingSteps),
      field("max-length", "Max length (tokens)", maxLength, "Longer examples are dropped."),
      field("seed", "Seed", seed),
      field("loss-type", "Loss type", lossType, "How DPO scores a preference pair."))),
    createButton, createError,
    h("h3", {}, "The same request"),
    h("div", { class: "snippet-head" }, h("span", {}, "curl"), copyButton(curl)), curl,
    h("div", { class: "snippet-head" }, h("span", {}, "Python (openai SDK)"), copyButton(python)),
    python);

  replace(root, h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "New job")),
    uploadForm, jobForm);

  // --- behaviour --------------------------------------------------------------------------
  const inputs = { model, "training-file": trainingFile, "validation-file": validationFile,
    method, suffix, length, "batch-size": batchSize, "lr-multiplier": lrMultiplier, beta,
    "lora-r": loraR, "lora-alpha": loraAlpha, "prompt-format": promptFormat,
    "save-steps": saveSteps, "logging-steps": loggingSteps, "max-length": maxLength, seed,
    "loss-type": lossType };
  // The API names a bad field by its JSON path; the form's input for it.
  const byParam = { model, training_file: trainingFile, validation_file: validationFile,
    method, "method.type": method, suffix, max_steps: length, n_epochs: length,
    "lora.r": loraR, "lora.alpha": loraAlpha, prompt_format: promptFormat,
    save_steps: saveSteps, logging_steps: loggingSteps, max_length: maxLength, seed,
    loss_type: lossType };
  const hyperparameters = { n_epochs: length, batch_size: batchSize,
    learning_rate_multiplier: lrMultiplier, beta };
  for (const at of ["hyperparameters", "method.supervised.hyperparameters",
    "method.dpo.hyperparameters"]) {
    for (const [name, input] of Object.entries(hyperparameters)) byParam[`${at}.${name}`] = input;
  }
  // The inputs only DPO has: shown while it is the method.
  const dpoOnly = [beta, lossType].map((input) => input.closest(".field"));
  const rateHelp = lrMultiplier.closest(".field").querySelector(".help");

  function requestBody() {
    const n = (input) => (input.value.trim() === "" ? null : Number(input.value));
    const body = { model: model.value.trim(), training_file: trainingFile.value };
    if (validationFile.value) body.validation_file = validationFile.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    const hp = { batch_size: n(batchSize), learning_rate_multiplier: n(lrMultiplier) };
    const amount = n(length);
    if (schedule.value === "steps") body.max_steps = amount;
    else if (Number.isInteger(amount)) hp.n_epochs = amount;
    else body.n_epochs = amount; // fractions of an epoch: lorafleet's field
    if (method.value === "dpo") {
      // Under the method, not top level: the API reads top-level hyperparameters first and
      // would not see the method's (beta among them).
      if (n(beta) !== null) hp.beta = n(beta);
      body.method = { type: "dpo", dpo: { hyperparameters: hp } };
    } else {
      body.hyperparameters = hp; // a supervised request is OpenAI's older, shorter shape
    }
    body.lora = { r: n(loraR), alpha: n(loraAlpha) };
    body.prompt_format = promptFormat.value;
    if (method.value === "dpo" && lossType.value !== LOSS_TYPES[0][0]) {
      body.loss_type = lossType.value;
    }
    // The rest only when changed from the API's defaults, to keep the request short.
    if (n(saveSteps) !== 50 && n(saveSteps) !== null) body.save_steps = n(saveSteps);
    if (n(loggingSteps) !== 10 && n(loggingSteps) !== null) body.logging_steps = n(loggingSteps);
    if (n(maxLength) !== 512 && n(maxLength) !== null) body.max_length = n(maxLength);
    if (n(seed) !== null) body.seed = n(seed);
    return body;
  }

  function showSnippets() {
    const body = requestBody();
    curl.textContent = curlSnippet(location.origin, body);
    python.textContent = pythonSnippet(location.origin, body);
  }

  async function loadChoices(selectId) {
    const [files, models, recent] = await Promise.all([
      api("/v1/files?purpose=fine-tune&limit=100"),
      api("/v1/models"),
      api("/v1/fine_tuning/jobs?limit=20"),
    ]);
    const keepTraining = selectId || trainingFile.value;
    const keepValidation = validationFile.value;
    for (const f of files.data) recordFormats.set(f.id, f.record_format);
    const options = files.data.map((f) => h("option", { value: f.id },
      `${f.filename} (${f.id}, ${f.line_count ?? "?"} lines, ${f.record_format ?? "?"})`));
    replace(trainingFile, options.length ? options
      : h("option", { value: "" }, "Upload a file first"));
    replace(validationFile, h("option", { value: "" }, "None"), options.map((o) => o.cloneNode(true)));
    if (keepTraining) trainingFile.value = keepTraining;
    if (keepValidation) validationFile.value = keepValidation;
    forTrainingFile();
    const bases = new Set([...recent.data.map((j) => j.model),
      ...models.data.map((m) => m.root)]);
    replace(modelChoices, [...bases].map((b) => h("option", { value: b })));
    // A sensible default: the base model this project trained last.
    if (!model.value && recent.data.length) model.value = recent.data[0].model;
    showSnippets();
  }

  // OpenAI's chat files (tools, several turns) train with the chat template, as the API does
  // for them when a request names no format; so do preference pairs, whose input is a chat.
  // A preference file trains with DPO, any other file supervised: the API refuses the others.
  const recordFormats = new Map();
  function forTrainingFile() {
    const format = recordFormats.get(trainingFile.value);
    if (format === "chat" || format === "preference") promptFormat.value = "chat";
    method.value = Object.keys(METHODS).find((m) => METHODS[m].recordFormat === format)
      || "supervised";
    showMethod();
  }
  function showMethod() {
    for (const wrapper of dpoOnly) wrapper.hidden = method.value !== "dpo";
    rateHelp.textContent = `× ${METHODS[method.value].baseRate}.`;
  }
  trainingFile.addEventListener("change", forTrainingFile);
  method.addEventListener("change", showMethod);

  schedule.addEventListener("change", () => {
    const steps = schedule.value === "steps";
    lengthLabel.textContent = steps ? "Number of steps" : "Number of epochs";
    length.value = steps ? 100 : 1;
    length.step = steps ? 1 : "any";
    length.min = steps ? 1 : 0.01;
    showSnippets();
  });
  jobForm.addEventListener("input", showSnippets);
  jobForm.addEventListener("change", showSnippets);

  uploadForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files && fileInput.files[0];
    if (!file) {
      replace(uploadResult, h("p", { class: "error" }, "Choose a JSONL file first."));
      fileInput.focus();
      return;
    }
    uploadButton.disabled = true;
    replace(uploadResult, h("p", { class: "muted" }, `Uploading ${file.name}…`));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const uploaded = await (await send("/v1/files", { method: "POST", form })).json();
      replace(uploadResult, h("p", { class: "ok" }, `Uploaded ${uploaded.filename} as `,
        h("code", {}, uploaded.id), `: ${uploaded.line_count} lines, format ` +
        `${uploaded.record_format}. It is selected as the training file below.`));
      await loadChoices(uploaded.id);
    } catch (e) {
      const line = e.status === 400 ? await badLine(file, e.message).catch(() => null) : null;
      replace(uploadResult, h("div", { class: "error-card", role: "alert" },
        h("p", { class: "error" }, `${file.name} was not accepted: ${e.message}`),
        line ? [h("p", {}, `Line ${line.number} of ${file.name}:`),
          h("pre", { class: "bad-line", "data-line": line.number }, line.text)] : null));
    } finally {
      uploadButton.disabled = false;
    }
  });

  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    createError.textContent = "";
    for (const input of Object.values(inputs)) input.removeAttribute("aria-invalid");
    const invalid = Object.values(inputs).find((input) => !input.closest("[hidden]")
      && !input.checkValidity());
    if (invalid) {
      invalid.setAttribute("aria-invalid", "true");
      const label = jobForm.querySelector(`label[for="${invalid.id}"]`);
      createError.textContent = `${label ? label.textContent : invalid.id}: ` +
        `${invalid.validationMessage}`;
      invalid.focus();
      return;
    }
    createButton.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: requestBody() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      createError.textContent = e.message;
      const input = e.param && byParam[e.param];
      if (input) {
        input.setAttribute("aria-invalid", "true");
        const details = input.closest("details");
        if (details) details.open = true; // "More settings": show the input named
        input.focus();
      }
    } finally {
      createButton.disabled = false;
    }
  });

  showMethod();
  showSnippets();
  loadChoices().catch((e) => { createError.textContent = e.message; });
  return () => {};
}
