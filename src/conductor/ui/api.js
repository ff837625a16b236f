// The API from the page: same origin, the login cookie authenticates (when tokens are on).

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

/** `body`: a value sent as JSON, or text sent as is when `contentType` is given. */
export async function api(method, path, body, contentType) {
  const opts = { method, headers: {}, credentials: 'same-origin' };
  if (contentType) {
    opts.headers['content-type'] = contentType;
    opts.body = body;
  } else if (body !== undefined) {
    opts.headers['content-type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!resp.ok) throw new ApiError(resp.status, data && data.detail !== undefined ? data.detail : data);
  return data;
}

/** FastAPI-style 422 details: `{field name: message}` for the body's fields. */
export function fieldErrors(err) {
  const out = {};
  if (err instanceof ApiError && Array.isArray(err.detail)) {
    for (const d of err.detail) {
      const loc = (d.loc || []).filter((x) => x !== 'body');
      out[loc.join('.') || '_'] = d.msg;
    }
  }
  return out;
}

/**
 * Wraps `read` (async) so that calls run it at most once per `gapMs`, one at a time; a call
 * that comes meanwhile runs once afterwards (live updates can arrive four times a second).
 */
export function paced(read, gapMs = 1000) {
  let running = false;
  let again = false;
  let last = 0;
  const run = async () => {
    if (running) { again = true; return; }
    running = true;
    const wait = last + gapMs - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    last = Date.now();
    try { await read(); } catch { /* the banner tells */ } finally {
      running = false;
      if (again) { again = false; run(); }
    }
  };
  return run;
}
