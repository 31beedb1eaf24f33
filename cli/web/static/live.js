// The page's live stream (common.js: live), in a dedicated worker. An EventSource is a request that never
// ends: opened by the page itself it keeps the page "loading" for good, and a headless browser's virtual time
// (`chromium --headless --virtual-time-budget=5000 --screenshot`) waits on the page's open requests, so such a
// screenshot never finished. A worker's requests are not the page's: the page settles once it has drawn.
"use strict";
let src = null;
onmessage = (e) => {
  if (src) src.close();
  src = new EventSource(e.data);  // an absolute URL (this script's own URL is under static/)
  src.onopen = () => postMessage({ open: true });
  src.onerror = () => postMessage({ error: true });
  src.onmessage = (m) => postMessage({ data: m.data });
};
