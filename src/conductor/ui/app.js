// The UI's entry: who am I (login when tokens are required), then the page the URL names,
// fed by one live socket.

import { h } from './dom.js';
import { api, ApiError } from './api.js';
import { Live } from './live.js';
import { deploymentsPage } from './deployments.js';
import { nodesPage } from './nodes.js';
import { detailPage } from './detail.js';
import { eventsPage } from './events.js';
import { envsPage } from './envs.js';
import { experimentsPage, servicesPage } from './mesh.js';
import { tokensPage } from './tokens.js';
import { runPage, runsPage } from './runs.js';

const main = document.getElementById('main');
const banner = document.getElementById('banner');
let live = null;
let unsubscribe = null;

function loginPage(message) {
  const token = h('input', { type: 'password', name: 'token', placeholder: 'SYMA1.…', autocomplete: 'off' });
  const status = h('p', { class: 'error', role: 'alert' }, message || '');
  const form = h('form', { id: 'login', class: 'card' },
    h('h2', {}, 'Sign in with an API token'), token, h('button', { type: 'submit' }, 'Sign in'), status);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await api('POST', '/auth/login', { token: token.value });
      history.replaceState(null, '', '/ui/deployments');
      start();
    } catch (err) {
      status.textContent = err.message;
    }
  });
  main.replaceChildren(form);
}

async function start() {
  let who;
  try {
    who = await api('GET', '/auth/whoami');
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return loginPage();
    banner.textContent = 'Cannot reach the conductor: ' + err.message;
    banner.hidden = false;
    return;
  }
  document.getElementById('who').textContent = who.auth_required ? `${who.name} (${who.role})` : '';
  // What the role cannot do is not shown.
  document.getElementById('nav-tokens').hidden = who.role !== 'admin';
  if (!live) live = new Live(banner);
  route(who);
}

function route(who) {
  if (unsubscribe) unsubscribe();
  const path = location.pathname.replace(/\/+$/, '');
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.getAttribute('href') === path);
  }
  const detail = path.match(/^\/ui\/deployments\/([^/]+)$/);
  const run = path.match(/^\/ui\/runs\/([^/]+)$/);
  if (path === '/ui/nodes') unsubscribe = nodesPage(main, live, who);
  else if (path === '/ui/tokens' && who.role === 'admin') unsubscribe = tokensPage(main, live);
  else if (path === '/ui/runs') unsubscribe = runsPage(main, live, who);
  else if (run) unsubscribe = runPage(main, live, who, decodeURIComponent(run[1]));
  else if (path === '/ui/events') unsubscribe = eventsPage(main);
  else if (path === '/ui/envs') unsubscribe = envsPage(main, live, who);
  else if (path === '/ui/experiments') unsubscribe = experimentsPage(main, live, who);
  else if (path === '/ui/services') unsubscribe = servicesPage(main, live);
  else if (detail) unsubscribe = detailPage(main, live, decodeURIComponent(detail[1]));
  else unsubscribe = deploymentsPage(main, live, who);
}

document.addEventListener('click', (ev) => {
  const a = ev.target.closest('a[data-nav]');
  if (!a) return;
  ev.preventDefault();
  history.pushState(null, '', a.getAttribute('href'));
  start();
});
window.addEventListener('popstate', start);
start();
