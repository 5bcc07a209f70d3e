// The project's models, and a playground that streams a completion or a chat reply from one.

import { api, query, send } from "../api.js";
import { h, replace } from "../dom.js";
import { time } from "../format.js";
import { sseData } from "../sse.js";

const JOB_OF_MODEL = /:(ftjob-[^:]+)(?::ckpt-step-\d+)?$/;

function kindOf(model) {
  if (!model.id.startsWith("ft:")) return "base model";
  return /:ckpt-step-\d+$/.test(model.id) ? "checkpoint" : "fine-tuned";
}

export function modelsView(root, params) {
  const error = h("p", { class: "error", role: "alert" });
  const body = h("tbody");
  const modelSelect = h("select", { id: "pg-model", name: "model", required: true });
  const modeCompletion = h("input", { type: "radio", name: "pg-mode", id: "pg-mode-completion",
    value: "completion", checked: true });
  const modeChat = h("input", { type: "radio", name: "pg-mode", id: "pg-mode-chat",
    value: "chat" });
  const promptLabel = h("label", { for: "pg-prompt" }, "Prompt");
  const prompt = h("textarea", { id: "pg-prompt", name: "prompt", rows: 5, required: true });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, max: 4096,
    step: 1, value: 64 });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2,
    step: "any", value: 0.7 });
  const raw = h("input", { id: "pg-raw", type: "checkbox", "aria-describedby": "pg-format" });
  const rawField = h("span", { class: "check" }, raw,
    h("label", { for: "pg-raw" }, "Raw prompt: send it as is, not wrapped in the prompt format"));
  const formatNote = h("p", { class: "help", id: "pg-format" });
  const sendButton = h("button", { type: "submit" }, "Send");
  const stopButton = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const reply = h("pre", { id: "pg-reply", class: "reply", "aria-live": "polite",
    "aria-busy": "false", tabindex: "0" });
  const replyStatus = h("p", { id: "pg-status", class: "muted", role: "status" });
  let models = [];
  let controller = null;
  const formats = new Map(); // job id -> its prompt format (a promise)

  const form = h("form", { class: "card playground", "aria-labelledby": "pg-title" },
    h("h2", { id: "pg-title" }, "Playground"),
    h("div", { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "pg-model" }, "Model"), modelSelect),
      h("fieldset", { class: "field" }, h("legend", {}, "Kind of request"),
        h("span", { class: "check" }, modeCompletion,
          h("label", { for: "pg-mode-completion" }, "Completion")),
        h("span", { class: "check" }, modeChat, h("label", { for: "pg-mode-chat" }, "Chat"))),
      h("div", { class: "field" }, h("label", { for: "pg-max-tokens" }, "Max tokens"), maxTokens),
      h("div", { class: "field" }, h("label", { for: "pg-temperature" }, "Temperature"),
        temperature)),
    h("div", { class: "field" }, promptLabel, prompt),
    rawField, formatNote,
    h("div", { class: "buttons" }, sendButton, stopButton),
    h("h3", {}, "Reply"), reply, replyStatus);

  replace(root,
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Models")),
    error,
    h("section", { "aria-labelledby": "models-title" },
      h("h2", { id: "models-title", class: "visually-hidden" }, "The project's models"),
      h("div", { class: "table-wrap" }, h("table", { class: "models" },
        h("thead", {}, h("tr", {}, ["Model", "Kind", "Trained from", "Created", ""].map(
          (c) => h("th", { scope: "col" }, c)))), body))),
    form);

  const isChat = () => modeChat.checked;

  async function describeFormat() {
    const id = modelSelect.value;
    rawField.hidden = isChat();
    promptLabel.textContent = isChat() ? "Message" : "Prompt";
    const match = JOB_OF_MODEL.exec(id);
    if (!id) {
      formatNote.textContent = "";
    } else if (!match) {
      formatNote.textContent = isChat()
        ? "A base model: the message is formatted with its tokenizer's chat template."
        : "A base model: the prompt is sent as it is.";
    } else {
      if (!formats.has(match[1])) {
        formats.set(match[1], api(`/v1/fine_tuning/jobs/${encodeURIComponent(match[1])}`)
          .then((job) => job.prompt_format).catch(() => null));
      }
      const fmt = await formats.get(match[1]);
      if (modelSelect.value !== id) return;
      const name = fmt ? fmt.type : "training";
      formatNote.textContent = isChat()
        ? (name === "chat" ? "Trained with the chat template: the conversation is formatted " +
          "with it." : `Trained with the ${name} prompt format: your message is the input, ` +
          "wrapped as at training.")
        : `Trained with the ${name} prompt format: your prompt is wrapped in it, as at ` +
          "training, and the reply stops at its end marker" +
          (raw.checked ? " (not now: raw prompt is on)." : ".");
    }
  }

  function renderModels() {
    replace(body, models.length === 0
      ? h("tr", {}, h("td", { colspan: 5, class: "muted" },
        "No models yet: a job that succeeds adds its fine-tuned model here."))
      : models.map((m) => h("tr", {},
        h("td", { class: "wrap" }, m.id),
        h("td", {}, kindOf(m)),
        h("td", { class: "wrap" }, m.parent || "—"),
        h("td", {}, time(m.created)),
        h("td", {}, h("button", {
          type: "button", class: "secondary small", "aria-label": `Use ${m.id} in the playground`,
          onclick: () => {
            modelSelect.value = m.id;
            describeFormat();
            history.replaceState(null, "", `#/models${query({ model: m.id })}`);
            prompt.focus();
          },
        }, "Use")))));
    const wanted = modelSelect.value || params.get("model");
    // Fine-tuned models first: they are what the playground is for.
    const ordered = [...models].sort((a, b) => Number(b.id.startsWith("ft:")) -
      Number(a.id.startsWith("ft:")));
    replace(modelSelect, ordered.map((m) => h("option", { value: m.id }, m.id)));
    if (wanted && models.some((m) => m.id === wanted)) modelSelect.value = wanted;
    else if (wanted) {
      error.textContent = `Model ${wanted} was not found in this project.`;
    }
    describeFormat();
  }

  async function stream(event) {
    event.preventDefault();
    if (!modelSelect.value || !prompt.value.trim()) {
      replyStatus.textContent = !modelSelect.value ? "Choose a model." : "Write a prompt first.";
      (modelSelect.value ? prompt : modelSelect).focus();
      return;
    }
    controller = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    reply.replaceChildren();
    reply.setAttribute("aria-busy", "true");
    reply.dataset.state = "streaming";
    replyStatus.textContent = "Waiting for the first token…";
    const chat = isChat();
    const request = {
      model: modelSelect.value, stream: true, max_tokens: Number(maxTokens.value) || 64,
      temperature: Number(temperature.value),
      ...(chat ? { messages: [{ role: "user", content: prompt.value }] }
        : { prompt: prompt.value, raw_prompt: raw.checked }),
    };
    let deltas = 0;
    let finish = null;
    try {
      const response = await send(chat ? "/v1/chat/completions" : "/v1/completions",
        { method: "POST", json: request, signal: controller.signal });
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          continue;
        }
        if (chunk.error) throw new Error(chunk.error.message || "The engine stopped.");
        for (const choice of chunk.choices || []) {
          const text = chat ? choice.delta && choice.delta.content : choice.text;
          if (text) {
            deltas += 1;
            reply.append(h("span", { class: "delta" }, text));
            replyStatus.textContent = "Streaming…";
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      reply.dataset.state = "done";
      replyStatus.textContent = `Done: ${deltas} pieces` +
        (finish ? `, finished by ${finish === "length" ? "max tokens" : finish}.` : ".");
    } catch (e) {
      const stopped = e && e.name === "AbortError";
      reply.dataset.state = stopped ? "stopped" : "error";
      replyStatus.textContent = stopped ? "Stopped." : `The request failed: ${e.message}`;
    } finally {
      reply.setAttribute("aria-busy", "false");
      sendButton.disabled = false;
      stopButton.disabled = true;
      controller = null;
    }
  }

  form.addEventListener("submit", stream);
  stopButton.addEventListener("click", () => controller && controller.abort());
  modelSelect.addEventListener("change", describeFormat);
  modeCompletion.addEventListener("change", describeFormat);
  modeChat.addEventListener("change", describeFormat);
  raw.addEventListener("change", describeFormat);

  api("/v1/models").then((list) => {
    models = list.data;
    renderModels();
  }).catch((e) => { error.textContent = e.message; });
  return () => controller && controller.abort();
}
