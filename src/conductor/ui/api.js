// The API from the page: same origin, the login cookie authenticates (when tokens are on).

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

export async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
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
