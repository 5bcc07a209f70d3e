// The console's shell: sign-in, navigation and the routes in the URL's fragment
// (#/jobs, #/jobs/<id>, #/new, #/models). Nothing here shows a stack trace: errors are told
// in words, and anything unexpected becomes one general message.

import { session } from "./api.js";
import { h, replace } from "./dom.js";
import { jobView } from "./views/job.js";
import { jobsView } from "./views/jobs.js";
import { modelsView } from "./views/models.js";
import { newJobView } from "./views/newjob.js";
import { signInView } from "./views/signin.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
const notice = document.getElementById("notice");
let cleanup = () => {};

function parseRoute() {
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const [path, search = ""] = hash.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(search) };
}

function show(message) {
  replace(notice, message ? h("p", {}, message) : null);
  notice.hidden = !message;
}

function route(signInMessage) {
  cleanup();
  cleanup = () => {};
  show("");
  const signedIn = Boolean(session.key);
  nav.hidden = !signedIn;
  signOutButton.hidden = !signedIn;
  if (!signedIn) {
    replace(main, signInView({ message: signInMessage, onSignedIn: () => route() }));
    focusHeading();
    return;
  }
  const { parts, params } = parseRoute();
  const [first = "jobs", second] = parts;
  for (const link of nav.querySelectorAll("a")) {
    const current = link.getAttribute("href") === `#/${first}`;
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (first === "jobs" && second) cleanup = jobView(main, second);
  else if (first === "jobs") cleanup = jobsView(main, params);
  else if (first === "new") cleanup = newJobView(main);
  else if (first === "models") cleanup = modelsView(main, params);
  else {
    replace(main, h("h1", { tabindex: "-1" }, "Page not found"),
      h("p", {}, h("a", { href: "#/jobs" }, "Go to the jobs")));
  }
  focusHeading();
}

function focusHeading() {
  // Keyboard and screen-reader users land on the new page's title.
  const heading = main.querySelector("h1");
  if (heading) heading.focus({ preventScroll: true });
}

window.addEventListener("hashchange", () => route());
window.addEventListener("lorafleet:unauthorized", () => {
  session.signOut();
  route("Your API key is no longer accepted (it may have been revoked). Sign in again.");
});
signOutButton.addEventListener("click", () => {
  session.signOut();
  location.hash = "#/jobs";
  route();
});
// Whatever slips through: one message, never the trace (the browser's console has it).
window.addEventListener("error", (event) => {
  // The browser's notice that a resize was handled a frame late: nothing went wrong.
  if (String(event.message).includes("ResizeObserver loop")) return;
  show("Something went wrong on this page. Reload it to try again.");
});
window.addEventListener("unhandledrejection", (event) => {
  const message = event.reason && event.reason.name === "ApiError" ? event.reason.message
    : "Something went wrong on this page. Reload it to try again.";
  show(message);
});

route();
