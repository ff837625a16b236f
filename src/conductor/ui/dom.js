// Building DOM without HTML strings: every user-provided value becomes a text node or an
// attribute value, never markup.

/** `h('td', {class: 'x'}, 'text', child)`: an element with attributes and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Sets a node's text only when it changed (no layout work for unchanged cells). */
export function setText(el, text) {
  const t = text === undefined || text === null ? '' : String(text);
  if (el.textContent !== t) el.textContent = t;
}

/**
 * Keeps `parent`'s children one element per item, in order (keyed by `key(item)`), building
 * an item's element again only when the item changed (an armed button elsewhere stays armed).
 */
export function keyed(parent, items, key, build) {
  const old = new Map([...parent.children].map((el) => [el.symphonyKey, el]));
  let prev = null;
  for (const item of items) {
    const k = key(item);
    const json = JSON.stringify(item);
    let el = old.get(k);
    old.delete(k);
    if (!el || el.symphonyJson !== json) {
      const fresh = build(item);
      fresh.symphonyKey = k;
      fresh.symphonyJson = json;
      if (el) el.replaceWith(fresh);
      el = fresh;
    }
    const want = prev ? prev.nextSibling : parent.firstChild;
    if (want !== el) parent.insertBefore(el, want);
    prev = el;
  }
  for (const el of old.values()) el.remove();
}
