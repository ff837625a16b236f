// What every form and row action shares: fields with a slot for the API's 422 on them, and
// a button that asks once more before it acts.

import { h, setText } from './dom.js';
import { fieldErrors } from './api.js';

/** Labelled fields whose errors land on them: `field()` makes one, `show()` places a failed
 * request's 422s (each on the field whose name is the longest prefix of its location, after
 * `key` maps the location), `clear()` empties them. */
export function fields(key = (loc) => loc) {
  const slots = {};
  return {
    field(name, label, input) {
      slots[name] = h('span', { class: 'error', 'data-error-for': name });
      return h('label', {}, label, input, slots[name]);
    },
    clear() {
      for (const s of Object.values(slots)) setText(s, '');
    },
    /** Shows `msg` on the field `name` (a check made before asking the API). */
    set(name, msg) {
      setText(slots[name], msg);
    },
    /** Returns whether any error found its field. */
    show(err) {
      let placed = false;
      for (const [loc, msg] of Object.entries(fieldErrors(err))) {
        const k = key(loc);
        const slot = Object.keys(slots)
          .filter((f) => k === f || k.startsWith(f + '.'))
          .sort((a, b) => b.length - a.length)[0];
        if (slot) { setText(slots[slot], msg); placed = true; }
      }
      return placed;
    },
  };
}

/** A `Delete` button: the first click asks to confirm, the second runs `action`; a failure
 * is shown on the button. `label` and `cls` make other such buttons (`Revoke`). */
export function deleteButton(action, label = 'Delete', cls = 'delete') {
  const b = h('button', { class: cls }, label);
  b.addEventListener('click', async () => {
    if (b.dataset.armed !== '1') { b.dataset.armed = '1'; setText(b, 'Confirm ' + label.toLowerCase()); return; }
    b.disabled = true;
    try { await action(); } catch (err) { setText(b, err.message); b.disabled = false; }
  });
  return b;
}
