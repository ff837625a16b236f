// The cluster's timeline: the newest events, then live ones, with a kind/object filter.

import { h } from './dom.js';
import { api } from './api.js';

const KEEP = 2000;

export function eventsPage(main) {
  const filter = h('input', { type: 'search', id: 'event-filter', placeholder: 'filter: kind, object or text' });
  const list = h('ol', { id: 'timeline', class: 'events' });
  main.replaceChildren(h('section', {}, h('div', { class: 'bar' }, filter), list));
  let last = 0;
  let socket = null;
  let closed = false;
  const matches = (li) => !filter.value || li.textContent.toLowerCase().includes(filter.value.toLowerCase());
  function add(events) {
    for (const e of events) {
      if (e.id <= last) continue;
      last = e.id;
      const li = h('li', { 'data-kind': e.kind, 'data-id': e.id },
        h('span', { class: 't' }, new Date(e.at_ms).toISOString().replace('T', ' ').slice(0, 23)), ' ',
        h('code', {}, e.kind), ' ', h('span', { class: 'o' }, e.object), ' ', e.message);
      li.hidden = !matches(li);
      list.prepend(li);
      if (list.children.length > KEEP) list.lastChild.remove();
    }
  }
  filter.addEventListener('input', () => { for (const li of list.children) li.hidden = !matches(li); });
  function follow() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    socket = new WebSocket(`${scheme}${location.host}/ws/events?after=${last}`);
    socket.onmessage = (ev) => add(JSON.parse(ev.data).events || []);
    socket.onclose = () => { if (!closed) setTimeout(follow, 1000); };
  }
  api('GET', '/events?limit=200').then((events) => { add(events); if (!closed) follow(); }).catch(() => {});
  return () => { closed = true; if (socket) socket.close(); };
}
