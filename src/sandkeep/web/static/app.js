/* sandkeep web UI: make every failed request visible in the page (htmx alone stays silent on them). */
(function () {
  "use strict";

  function flash(text) {
    var box = document.getElementById("flash");
    if (!box) { return; }
    var div = document.createElement("div");
    div.className = "flash flash-error";
    div.setAttribute("role", "alert");
    var strong = document.createElement("strong");
    strong.textContent = "Error:";
    div.appendChild(strong);
    div.appendChild(document.createTextNode(" " + text));
    box.replaceChildren(div);
  }

  function connection(text) {
    var line = document.getElementById("conn");
    if (!line) { return; }
    if (text) {
      line.textContent = text;
      line.hidden = false;
    } else if (!line.hidden) {
      line.hidden = true;
      line.textContent = "";
    }
  }

  function isPoll(evt) {
    var elt = evt.detail && evt.detail.elt;
    return !!(elt && elt.id === "live");
  }

  /* The message of a sandkeep error page (e.g. the CSRF or "Admins only" page), if the answer is one. */
  function pageMessage(xhr) {
    try {
      var doc = new DOMParser().parseFromString(xhr.responseText || "", "text/html");
      var p = doc.querySelector(".error-page p, .flash");
      var h = doc.querySelector(".error-page h1");
      var text = p ? p.textContent.replace(/\s+/g, " ").trim() : "";
      return text ? (h ? h.textContent.trim() + ": " : "") + text : "";
    } catch (e) {
      return "";
    }
  }

  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail && evt.detail.xhr;
    var status = xhr ? xhr.status : 0;
    if (isPoll(evt)) {
      connection("Live updates paused: the server answered HTTP " + status + ". Retrying…");
      return;
    }
    var message = xhr ? pageMessage(xhr) : "";
    flash("the server answered HTTP " + status + (message ? " — " + message :
          " and the action may not have happened. Reload the page to see the current state, then try again."));
  });

  function unreachable(evt) {
    if (isPoll(evt)) {
      connection("Lost the connection to sandkeep; the page is not updating. Retrying…");
      return;
    }
    flash("could not reach sandkeep (network error or timeout); the action was not carried out. " +
          "Check your connection and try again.");
  }

  /* Keep keyboard users in place when a live update replaces or disables the control they were on:
     htmx restores focus only to an element with the same id that can still take it. */
  var lastFocus = null;
  document.addEventListener("focusin", function (evt) {
    var live = document.getElementById("live");
    var el = evt.target;
    if (!live || el === live || !live.contains(el)) { lastFocus = null; return; }
    var box = el.parentElement;
    while (box && box !== live && !box.id) { box = box.parentElement; }
    lastFocus = {id: el.id || "", container: box && box !== live ? box.id : ""};
  });
  // a click on the page is the person choosing where focus goes (focusin then records it, if anywhere)
  document.addEventListener("pointerdown", function () { lastFocus = null; }, true);

  function focusQuietly(el) {
    if (!el || el.disabled || !el.getClientRects().length) { return false; }
    el.focus({preventScroll: true});
    if (document.activeElement !== el && !el.hasAttribute("tabindex")) {
      el.setAttribute("tabindex", "-1");  // a card or section: focusable from script only
      el.focus({preventScroll: true});
    }
    return document.activeElement === el;
  }

  document.addEventListener("htmx:afterSettle", function () {
    var active = document.activeElement;
    if (!lastFocus || (active && active !== document.body)) { return; }
    var target = lastFocus;
    if (focusQuietly(target.id ? document.getElementById(target.id) : null)) { return; }
    focusQuietly(target.container ? document.getElementById(target.container) : null);
  });

  document.addEventListener("htmx:sendError", unreachable);
  document.addEventListener("htmx:timeout", unreachable);
  document.addEventListener("htmx:afterRequest", function (evt) {
    if (isPoll(evt) && evt.detail.successful) { connection(""); }
  });
})();
