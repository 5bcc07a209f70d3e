// Building the page: elements are made with createElement and text is always set as text, never
// parsed as HTML, so whatever a job or a model's reply holds is shown as it is.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children: nodes, strings (as text), arrays of them; null and false are skipped. */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An HTML element: h("a", {href: "#/jobs"}, "Jobs"). */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/**
 * Run `render`, which replaces part of `container`, and give the focus back to the element of
 * the same `data-focus` key: a live-updated table or toolbar must not drop a keyboard user's
 * place every time it refreshes.
 */
export function keepingFocus(container, render) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.getAttribute("data-focus") : null;
  render();
  if (!key) return;
  const candidates = [...container.querySelectorAll("[data-focus]")];
  // Gone (a Pause button once the job paused): the nearest thing left to act on.
  const again = candidates.find((el) => el.getAttribute("data-focus") === key) || candidates[0];
  if (again) again.focus({ preventScroll: true });
}
