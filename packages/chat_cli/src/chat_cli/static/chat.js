// The chat page of `chat-cli serve`. It talks to this server's OpenAI-compatible API only:
// GET v1/models names the model, POST v1/chat/completions streams each answer as server-sent events.
// Nothing a model writes is ever parsed as HTML: the Markdown renderer below builds elements and
// puts the model's text in them as text.

const KEY_STORAGE = "chat-cli.api-key";
const $ = (id) => document.getElementById(id);

const chat = {
  history: [], // this conversation's {role, content} messages, without the system prompt
  controller: null, // the AbortController of the answer being streamed, if any
  apiKey: localStorage.getItem(KEY_STORAGE) || "",
  keyPrompt: null, // the pending API-key question, shared by every request that got a 401
};

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- The API --------------------------------------------------------------------------------------

// fetch() with the API key; a 401 asks the user for a key (saying why the last one failed) and tries again.
async function callApi(path, init = {}) {
  for (;;) {
    const headers = { ...init.headers };
    if (chat.apiKey) headers.Authorization = `Bearer ${chat.apiKey}`;
    const response = await fetch(path, { ...init, headers });
    if (response.ok) return response;
    const message = await errorMessage(response);
    if (response.status !== 401) throw new HttpError(response.status, message);
    await askForApiKey(chat.apiKey ? message : "");
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message; // OpenAI's {"error": {"message": ...}}
  } catch {
    return `${response.status} ${response.statusText} ${text.slice(0, 200)}`.trim();
  }
}

function askForApiKey(reason) {
  $("key-error").textContent = reason;
  $("api-key").value = "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  chat.keyPrompt ??= new Promise((resolve, reject) => {
    const done = () => {
      $("key-form").removeEventListener("submit", onSubmit);
      dialog.removeEventListener("cancel", onCancel);
      chat.keyPrompt = null;
    };
    const onSubmit = (event) => {
      event.preventDefault();
      done();
      chat.apiKey = $("api-key").value.trim();
      localStorage.setItem(KEY_STORAGE, chat.apiKey); // asked once, also across reloads
      dialog.close();
      resolve();
    };
    const onCancel = () => {
      done();
      reject(new HttpError(401, "this server needs an API key, and none was given"));
    };
    $("key-form").addEventListener("submit", onSubmit);
    dialog.addEventListener("cancel", onCancel);
  });
  return chat.keyPrompt;
}

// The `data:` payloads of a text/event-stream response, parsed, until `[DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer
          .slice(0, end)
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- The conversation -----------------------------------------------------------------------------

const modelReady = loadModel();

async function loadModel() {
  try {
    const [card] = (await (await callApi("v1/models")).json()).data;
    $("model").textContent = card.id;
    if (card.max_model_len) $("max-tokens").max = card.max_model_len;
    return card.id;
  } catch (error) {
    $("model").textContent = "no model";
    showPageError(`Cannot list the server's models: ${describeError(error)}`);
    return null;
  }
}

function requestSettings() {
  const settings = {};
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) settings.temperature = temperature;
  if (!Number.isNaN(maxTokens)) settings.max_tokens = maxTokens;
  return settings;
}

async function send(text) {
  const history = chat.history; // a new chat replaces it; this answer belongs to this one
  const system = $("system-prompt").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: text }];
  history.push({ role: "user", content: text });
  addMessage("user").content.textContent = text;
  const view = addMessage("assistant");
  const controller = (chat.controller = new AbortController());
  setBusy(true);
  let answer = "";
  let finishReason = null;
  let usage = null;
  let firstTokenAt = null;
  try {
    const model = await modelReady;
    const body = { model, messages, stream: true, stream_options: { include_usage: true }, ...requestSettings() };
    const response = await callApi("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new HttpError(0, event.error.message); // failed after the stream began
      for (const choice of event.choices) {
        answer += choice.delta.content ?? "";
        finishReason = choice.finish_reason ?? finishReason;
      }
      firstTokenAt ??= answer ? performance.now() : null;
      usage = event.usage ?? usage;
      const follow = isScrolledDown();
      renderMarkdown(answer, view.content);
      if (follow) scrollDown();
    }
    view.meta.textContent = describeAnswer(usage, finishReason, firstTokenAt && performance.now() - firstTokenAt);
  } catch (error) {
    if (controller.signal.aborted) {
      view.meta.textContent = "stopped";
    } else {
      view.article.classList.add("failed");
      view.meta.textContent = describeError(error);
    }
  } finally {
    view.article.removeAttribute("aria-busy");
    if (answer) history.push({ role: "assistant", content: answer }); // what was shown is what the model said
    if (chat.controller === controller) {
      chat.controller = null;
      setBusy(false);
    }
  }
}

function stop() {
  chat.controller?.abort(); // closes the connection: the server cancels the request and frees its slot
}

function newChat() {
  stop();
  chat.history = [];
  $("messages").replaceChildren();
  $("page-error").hidden = true;
  $("prompt").focus();
}

// "42 tokens · 12.3 tokens/s": the decode rate, from the first token on.
function describeAnswer(usage, finishReason, decodeMs) {
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (usage?.completion_tokens > 1 && decodeMs > 0) {
    parts.push(`${(((usage.completion_tokens - 1) * 1000) / decodeMs).toFixed(1)} tokens/s`);
  }
  if (finishReason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function describeError(error) {
  if (error instanceof HttpError) return error.status ? `Error ${error.status}: ${error.message}` : `Error: ${error.message}`;
  return `Cannot reach the server (${error.message})`;
}

// --- The page -------------------------------------------------------------------------------------

function addMessage(role) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  if (role === "assistant") article.setAttribute("aria-busy", "true");
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  article.append(content, meta);
  $("messages").append(article);
  scrollDown();
  return { article, content, meta };
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function showPageError(message) {
  $("page-error").textContent = message;
  $("page-error").hidden = false;
}

function isScrolledDown() {
  const messages = $("messages");
  return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
}

function scrollDown() {
  $("messages").scrollTop = $("messages").scrollHeight;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);

// --- Markdown, as elements: fenced code, headings, lists, quotes, rules, paragraphs; inline code,
// bold, italic, http(s) links. The model's text only ever becomes text nodes. ------------------------

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s*>/;
const LIST_ITEM = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/;
const INLINE = new RegExp(
  [
    /`([^`\n]+)`/.source, // 1: code
    /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 2, 3: a link's text and URL
    /\*\*(.+?)\*\*/.source, // 4: bold
    /__(.+?)__/.source, // 5: bold
    /\*([^*\s](?:[^*]*[^*\s])?)\*/.source, // 6: italic
    /(?<!\w)_([^_\s](?:[^_]*[^_\s])?)_(?!\w)/.source, // 7: italic
    /(https?:\/\/[^\s<>()"']*[^\s<>()"'.,;:!?])/.source, // 8: a bare URL
  ].join("|"),
  "g",
);

function renderMarkdown(text, container) {
  container.replaceChildren(...markdownBlocks(text.split("\n")));
}

function markdownBlocks(lines) {
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if ((match = line.match(FENCE))) {
      const code = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(match[1]); i++) code.push(lines[i]);
      i++; // the closing fence, if it came yet
      blocks.push(codeBlock(code.join("\n"), match[2]));
    } else if ((match = line.match(HEADING))) {
      blocks.push(withInline(`h${match[1].length}`, match[2]));
      i++;
    } else if (RULE.test(line)) {
      blocks.push(document.createElement("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(/^\s*>\s?/, ""));
      const quote = document.createElement("blockquote");
      quote.append(...markdownBlocks(quoted));
      blocks.push(quote);
    } else if (LIST_ITEM.test(line)) {
      let list;
      [list, i] = listBlock(lines, i);
      blocks.push(list);
    } else if (line.trim()) {
      const paragraph = document.createElement("p");
      for (let first = true; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++, first = false) {
        if (!first) paragraph.append(document.createElement("br"));
        appendInline(paragraph, lines[i]);
      }
      blocks.push(paragraph);
    } else {
      i++;
    }
  }
  return blocks;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

// The list that starts at lines[start] (items indented further nest inside the item before them).
function listBlock(lines, start) {
  const [, indent, marker] = lines[start].match(LIST_ITEM);
  const ordered = /\d/.test(marker);
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered && parseInt(marker, 10) !== 1) list.start = parseInt(marker, 10);
  let item = null;
  let i = start;
  while (i < lines.length) {
    const match = lines[i].match(LIST_ITEM);
    if (match && match[1].length === indent.length && /\d/.test(match[2]) === ordered) {
      item = withInline("li", match[3]);
      list.append(item);
      i++;
    } else if (match && match[1].length > indent.length && item) {
      let nested;
      [nested, i] = listBlock(lines, i);
      item.append(nested);
    } else if (!match && item && /^\s+\S/.test(lines[i]) && !startsBlock(lines[i])) {
      item.append(document.createElement("br")); // a continuation line of the item
      appendInline(item, lines[i].trim());
      i++;
    } else {
      break;
    }
  }
  return [list, i];
}

function codeBlock(text, language) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (language) {
    code.className = `language-${language}`;
    pre.dataset.language = language;
  }
  code.textContent = text;
  pre.append(code);
  return pre;
}

function withInline(tag, text) {
  const element = document.createElement(tag);
  appendInline(element, text);
  return element;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(last, match.index), inlineElement(match)); // strings become text nodes
    last = match.index + match[0].length;
  }
  parent.append(text.slice(last));
}

function inlineElement([whole, code, linkText, href, bold, bold2, italic, italic2, url]) {
  if (code !== undefined) {
    const element = document.createElement("code");
    element.textContent = code;
    return element;
  }
  if (linkText !== undefined) return link(href, linkText) ?? whole;
  if (bold !== undefined || bold2 !== undefined) return withInline("strong", bold ?? bold2);
  if (italic !== undefined || italic2 !== undefined) return withInline("em", italic ?? italic2);
  return link(url, url) ?? whole;
}

// An <a> for absolute http(s) URLs only: javascript:, data: and relative URLs stay text.
function link(href, label) {
  let url;
  try {
    url = new URL(href);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  const anchor = document.createElement("a");
  anchor.href = url.href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer nofollow";
  anchor.textContent = label;
  return anchor;
}
