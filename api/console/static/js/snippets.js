// The request the new-job form sends, as a curl command and as Python with the openai SDK
// (lorafleet's extensions go in extra_body), for a person to copy. The key is never put in
// them: they read it from LORAFLEET_API_KEY.

// OpenAI's own fields of POST /v1/fine_tuning/jobs; the SDK takes them as arguments.
const OPENAI_FIELDS = ["model", "training_file", "validation_file", "hyperparameters", "method",
  "suffix", "seed", "metadata", "integrations"];

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

/** A Python literal of a JSON value. */
export function pyLiteral(value, indent = 0) {
  const pad = " ".repeat(indent + 4);
  const end = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    return `[\n${value.map((v) => pad + pyLiteral(v, indent + 4)).join(",\n")},\n${end}]`;
  }
  const entries = Object.entries(value);
  if (entries.length === 0) return "{}";
  return `{\n${entries.map(([k, v]) => `${pad}${JSON.stringify(k)}: ` +
    `${pyLiteral(v, indent + 4)}`).join(",\n")},\n${end}}`;
}

export function curlSnippet(origin, body) {
  return [
    `curl -s ${origin}/v1/fine_tuning/jobs \\`,
    '  -H "Authorization: Bearer $LORAFLEET_API_KEY" \\',
    '  -H "Content-Type: application/json" \\',
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

export function pythonSnippet(origin, body) {
  const args = [];
  const extra = {};
  for (const [k, v] of Object.entries(body)) {
    if (OPENAI_FIELDS.includes(k)) args.push(`    ${k}=${pyLiteral(v, 4)},`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${pyLiteral(extra, 4)},`);
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin}/v1", api_key=os.environ["LORAFLEET_API_KEY"])`,
    "job = client.fine_tuning.jobs.create(",
    ...args,
    ")",
    "print(job.id, job.status)",
  ].join("\n");
}
