// Server-sent events read from a fetch() response body (EventSource cannot send the
// Authorization header, nor POST).

const BOUNDARY = /\r?\n\r?\n/;

/** The `data` of each event of `response`, as it arrives. */
export async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const take = function* () {
    let match;
    while ((match = BOUNDARY.exec(buffer)) !== null) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    yield* take();
  }
  buffer += `${decoder.decode()}\n\n`;
  yield* take();
}
