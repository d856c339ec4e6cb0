// Dandelion or grass: the upload page. Plain JavaScript, no framework; it calls POST /predict?explain=true (the
// answer and where the model looked), and POST /feedback when the user says what the photo really shows.
"use strict";

(() => {
  const MAX_BYTES = 10 * 1024 * 1024; // the API's default per-file limit; the server still enforces its own
  const CONCURRENCY = 4; // one request per photo, a few at a time
  const CLASS_ORDER = ["dandelion", "grass"];
  const NEITHER = "neither"; // the third feedback answer: neither a dandelion nor grass
  const ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF";

  const input = document.getElementById("file");
  const dropzone = document.getElementById("dropzone");
  const results = document.getElementById("results");
  const empty = document.getElementById("empty");
  const clearButton = document.getElementById("clear");
  const template = document.getElementById("card-template");

  const objectUrls = new Set();
  const queue = [];
  let running = 0;

  // ---- choosing photos: picker, keyboard, drag and drop, paste ----

  const openPicker = () => input.click();

  dropzone.addEventListener("click", openPicker);
  dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openPicker();
    }
  });

  input.addEventListener("change", () => {
    addFiles(Array.from(input.files || []));
    input.value = ""; // choosing the same photo again fires "change" again
  });

  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    dropzone.classList.add("dragging");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) dropzone.classList.remove("dragging");
  });
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // a photo dropped anywhere on the page is classified, never opened by the browser
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    dropzone.classList.remove("dragging");
    addFiles(Array.from(event.dataTransfer.files || []));
  });

  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files || []);
    if (files.length === 0) return;
    event.preventDefault();
    addFiles(files);
  });

  clearButton.addEventListener("click", () => {
    queue.length = 0;
    for (const url of objectUrls) URL.revokeObjectURL(url);
    objectUrls.clear();
    results.replaceChildren();
    clearButton.hidden = true;
    empty.hidden = false;
    dropzone.focus();
  });

  // ---- one card per photo, one request per photo ----

  function addFiles(files) {
    if (files.length === 0) return;
    const batch = document.createDocumentFragment();
    for (const file of files) {
      const card = newCard(file);
      batch.append(card);
      const problem = checkLocally(file);
      if (problem) showError(card, problem.title, problem.text, "");
      else enqueue(() => classify(file, card));
    }
    results.prepend(batch); // newest photos first, each batch in the order chosen
    empty.hidden = true;
    clearButton.hidden = false;
  }

  function newCard(file) {
    const card = template.content.firstElementChild.cloneNode(true);
    const name = file.name || "pasted image";
    card.dataset.filename = name;
    card.querySelector(".filename").textContent = name;
    card.querySelector(".filename").title = name;
    const box = card.querySelector(".thumb-box");
    const img = card.querySelector(".thumb");
    if (file.type.startsWith("image/") && file.size <= MAX_BYTES) {
      const url = URL.createObjectURL(file);
      objectUrls.add(url);
      img.alt = `Preview of ${name}`;
      img.addEventListener("error", () => box.classList.add("no-preview"), { once: true });
      img.src = url;
    } else {
      box.classList.add("no-preview");
    }
    return card;
  }

  function checkLocally(file) {
    if (file.type && !file.type.startsWith("image/")) {
      return {
        title: "Not an image",
        text: `This file is ${file.type}, not a photo. Choose a ${ACCEPTED} image.`,
      };
    }
    if (file.size === 0) {
      return { title: "Empty file", text: "This file is empty. Choose a photo." };
    }
    if (file.size > MAX_BYTES) {
      return {
        title: "Too large",
        text: `This file is ${formatBytes(file.size)}; photos must be at most ${formatBytes(MAX_BYTES)}.`,
      };
    }
    return null;
  }

  function enqueue(task) {
    queue.push(task);
    pump();
  }

  function pump() {
    while (running < CONCURRENCY && queue.length > 0) {
      const task = queue.shift();
      running += 1;
      task().finally(() => {
        running -= 1;
        pump();
      });
    }
  }

  async function classify(file, card) {
    setPending(card);
    const form = new FormData();
    form.append("file", file, file.name || "pasted-image");
    const started = performance.now();
    let response;
    let body = null;
    try {
      response = await fetch("/predict?explain=true", {
        method: "POST",
        body: form,
        headers: { Accept: "application/json" },
      });
      body = await response.json().catch(() => null);
    } catch {
      const ms = performance.now() - started;
      showError(card, "Request failed", "Could not reach the server. Check the connection and try again.", "", ms, file);
      return;
    }
    const ms = performance.now() - started;
    if (response.ok && body && typeof body.label === "string") {
      showResult(card, body, ms);
    } else {
      const { title, text } = describeError(response.status, body);
      const code = body?.error_code ? `${body.error_code} · ` : "";
      const retry = response.status >= 500 ? file : null;
      showError(card, title, text, `HTTP ${response.status} · ${code}`, ms, retry);
    }
  }

  function describeError(status, body) {
    // The server names the file ("file 1 ('x.jpg'): ..."); the card already does, so only the reason is kept.
    const reason = typeof body?.message === "string" ? body.message.replace(/^file \d+ \(.*?\):\s*/, "") : "";
    const detail = reason ? ` (${reason})` : "";
    switch (body?.error_code) {
      case "INVALID_IMAGE":
        return { title: "Not an image", text: `This file is not a photo the model can read${detail}. Choose a ${ACCEPTED} image.` };
      case "PAYLOAD_TOO_LARGE":
        return { title: "Too large", text: `This photo is over the server's size limit${detail}.` };
      case "UNSUPPORTED_MEDIA_TYPE":
        return { title: "Not accepted", text: `The server did not accept this upload${detail}.` };
      case "MODEL_NOT_READY":
        return { title: "Model not ready", text: "The model is still loading. Try again in a moment." };
      default:
        break;
    }
    if (status === 413) return { title: "Too large", text: "This photo is over the server's size limit." };
    if (status === 400) return { title: "Not accepted", text: `The server refused this file${detail}.` };
    if (status === 503 || status === 504) {
      return { title: "Server busy", text: `The server could not classify the photo right now${detail}. Try again.` };
    }
    return { title: "Something went wrong", text: `The server answered with an error (HTTP ${status})${detail}.` };
  }

  // ---- rendering ----

  function setPending(card) {
    card.dataset.state = "pending";
    delete card.dataset.label;
    delete card.dataset.unsure;
    delete card.dataset.outside;
    delete card.dataset.reason;
    hideWhy(card);
    card.querySelector(".label").textContent = "Classifying…";
    card.querySelector(".confidence").textContent = "";
    card.querySelector(".bars").replaceChildren();
    card.querySelector(".meta").replaceChildren();
    const feedback = card.querySelector(".feedback");
    feedback.hidden = true;
    feedback.replaceChildren();
    const error = card.querySelector(".error");
    error.hidden = true;
    error.replaceChildren();
  }

  function showResult(card, body, ms) {
    card.dataset.state = "done";
    card.dataset.label = body.label;
    // A photo unlike every training photo gets no verdict, only the model's (shown) probabilities; below the
    // server's low-confidence threshold the answer is a guess, and the card says so.
    const outside = body.in_domain === false;
    const unsure = !outside && body.low_confidence === true;
    card.dataset.outside = String(outside);
    card.dataset.unsure = String(unsure);
    if (outside && body.out_of_domain_reason) card.dataset.reason = body.out_of_domain_reason;
    let verdict = capitalize(body.label);
    if (outside && body.out_of_domain_reason === "looks_like_refused_kind") {
      verdict = "This looks like another flower, not a dandelion"; // a kind the model was taught to refuse
    } else if (outside) {
      verdict = "This does not look like a photo of dandelions or grass";
    } else if (unsure) {
      verdict = `Not sure: perhaps ${body.label}`;
    }
    card.querySelector(".label").textContent = verdict;
    card.querySelector(".confidence").textContent = outside
      ? `; the model would say ${body.label}, ${percent(body.confidence)}`
      : `, ${percent(body.confidence)} confidence`;

    const bars = card.querySelector(".bars");
    const classes = Object.keys(body.probabilities || {}).sort(
      (a, b) => rank(a) - rank(b) || a.localeCompare(b),
    );
    for (const name of classes) bars.append(barRow(name, Number(body.probabilities[name]) || 0));

    const meta = card.querySelector(".meta");
    const model = document.createElement("span");
    model.className = "model";
    model.textContent = `Model ${body.model?.name ?? "?"} v${body.model?.version ?? "?"}`;
    const timing = document.createElement("span");
    timing.className = "timing";
    timing.textContent = `${Math.round(ms)} ms`;
    meta.replaceChildren(model, " · ", timing);
    showWhy(card, body.explain);
    if (typeof body.id === "string") showFeedback(card, body, outside);
  }

  // "Why?": the class activation map from /predict?explain=true, laid over the thumbnail on demand. The model saw
  // the whole photo squeezed to a square; the thumbnail shows its centre (object-fit: cover), so the map is given
  // the photo's own proportions and centred the same way, and its cells fall on the parts they describe.
  function showWhy(card, explain) {
    const button = card.querySelector(".why");
    const overlay = card.querySelector(".heatmap");
    const thumb = card.querySelector(".thumb");
    if (!explain || typeof explain.png !== "string" || !explain.png.startsWith("data:image/png;base64,")) return;
    overlay.src = explain.png;
    overlay.alt = `Where the model looked for ${explain.for ?? "its answer"}: orange where the evidence was strongest`;
    const fit = () => {
      const wide = thumb.naturalWidth >= thumb.naturalHeight;
      overlay.style.aspectRatio = `${thumb.naturalWidth || 1} / ${thumb.naturalHeight || 1}`;
      overlay.style.width = wide ? "auto" : "100%";
      overlay.style.height = wide ? "100%" : "auto";
    };
    if (thumb.complete) fit();
    else thumb.addEventListener("load", fit, { once: true });
    button.onclick = () => {
      const on = button.getAttribute("aria-pressed") !== "true";
      button.setAttribute("aria-pressed", String(on));
      button.textContent = on ? "Hide why" : "Why?";
      overlay.hidden = !on;
    };
    button.title = "Show where the model looked";
    button.hidden = false;
  }

  function hideWhy(card) {
    const button = card.querySelector(".why");
    const overlay = card.querySelector(".heatmap");
    button.hidden = true;
    button.onclick = null;
    button.setAttribute("aria-pressed", "false");
    button.textContent = "Why?";
    overlay.hidden = true;
    overlay.removeAttribute("src");
  }

  // What the photo really shows goes to POST /feedback. Three answers everywhere: dandelion, grass, or neither
  // (something else), so a photo the model flagged is never filed under a class it is not.
  function showFeedback(card, body, outside) {
    const box = card.querySelector(".feedback");
    const button = (text, label, name) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = `button-secondary feedback-${name}`;
      b.textContent = text;
      b.dataset.label = label;
      b.addEventListener("click", () => sendFeedback(box, body.id, label));
      return b;
    };
    const question = document.createElement("span");
    question.className = "feedback-question";
    const choices = document.createElement("span");
    choices.className = "feedback-choices";
    if (outside) {
      question.textContent = "Is it dandelion, grass, or neither?";
      choices.append(
        ...CLASS_ORDER.map((name) => button(capitalize(name), name, name)),
        button("Neither", NEITHER, NEITHER),
      );
    } else {
      const other = CLASS_ORDER.find((name) => name !== body.label) ?? "";
      question.textContent = "Right?";
      choices.append(
        button("Yes", body.label, "yes"),
        button(`No, it is ${other}`, other, "no"),
        button("Neither", NEITHER, NEITHER),
      );
    }
    box.setAttribute("aria-label", question.textContent);
    box.replaceChildren(question, choices);
    box.hidden = false;
  }

  async function sendFeedback(box, id, label) {
    box.querySelectorAll("button").forEach((button) => { button.disabled = true; });
    let status = 0;
    try {
      const response = await fetch("/feedback", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ prediction_id: id, label }),
      });
      status = response.status;
    } catch {
      status = 0;
    }
    box.removeAttribute("aria-label");
    if (status === 200 || status === 201) {
      box.textContent = `Thanks: recorded as ${label}.`;
    } else if (status === 409) {
      box.textContent = "This photo already has an answer.";
    } else if (status === 401) {
      box.textContent = "This server only takes feedback from authorised clients.";
    } else if (status === 429) {
      box.textContent = "Too many answers from this address for now; try again in a minute.";
    } else {
      box.textContent = "Feedback could not be recorded right now.";
    }
    box.dataset.status = String(status);
  }

  function barRow(name, p) {
    const row = document.createElement("div");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.className = "bar-name";
    label.id = `bar-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(36).slice(2)}`;
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-labelledby", label.id);
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", (p * 100).toFixed(1));
    bar.setAttribute("aria-valuetext", percent(p));
    bar.dataset.class = name;
    const fill = document.createElement("div");
    fill.className = `bar-fill ${CLASS_ORDER.includes(name) ? name : ""}`;
    bar.append(fill);
    requestAnimationFrame(() => {
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`; // CSSOM, allowed by the CSP
    });
    const value = document.createElement("span");
    value.className = "bar-value";
    value.setAttribute("aria-hidden", "true");
    value.textContent = percent(p);
    row.append(label, bar, value);
    return row;
  }

  function showError(card, title, text, prefix, ms, retryFile) {
    card.dataset.state = "error";
    delete card.dataset.label;
    delete card.dataset.unsure;
    delete card.dataset.outside;
    delete card.dataset.reason;
    hideWhy(card);
    card.querySelector(".feedback").hidden = true;
    card.querySelector(".label").textContent = title;
    card.querySelector(".confidence").textContent = "";
    card.querySelector(".bars").replaceChildren();
    const error = card.querySelector(".error");
    error.textContent = text;
    error.hidden = false;
    const meta = card.querySelector(".meta");
    meta.replaceChildren();
    if (prefix || ms !== undefined) {
      meta.textContent = `${prefix}${ms !== undefined ? `${Math.round(ms)} ms` : ""}`;
    }
    if (retryFile) {
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "button-secondary retry";
      retry.textContent = "Try again";
      retry.addEventListener("click", () => enqueue(() => classify(retryFile, card)));
      error.append(" ", retry);
    }
  }

  const rank = (name) => {
    const i = CLASS_ORDER.indexOf(name);
    return i === -1 ? CLASS_ORDER.length : i;
  };
  const capitalize = (s) => s.charAt(0).toUpperCase() + s.slice(1);
  const percent = (p) => `${(Math.max(0, Math.min(1, Number(p) || 0)) * 100).toFixed(1)}%`;

  function formatBytes(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(n % (1024 * 1024) ? 1 : 0)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} KB`;
    return `${n} bytes`;
  }
})();
