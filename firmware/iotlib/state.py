# Device shadow client (docs/protocol.md §4, AWS-shadow semantics). The rule the anchors' users ask for: on every
# (re)connect GET the full document first and act on its delta, so no desired change is missed while offline.
# Reported updates are partial, carry the version they were based on, and are retried after a 409 with the fresh
# document. While offline they wait in a small queue that coalesces them.
# A device-side override (override(): a local command, a timer, a safety rule) of a desired value already applied clears
# that desired key in the same versioned update, so the stale value is never applied again; a desired value written
# after it (a new metadata timestamp) is applied as usual (docs/protocol.md §4, "Who wins").
from iotlib.compat import asyncio

_MISSING = object()


class StateError(Exception):
    """The state server refused a request (non-2xx other than a handled 409/401); str(e) says why."""


def _log():
    try:
        from iotlib.log import get
    except ImportError:
        return None
    return get("state")


def depth(obj, limit=32):
    """Nesting depth of dicts (a scalar is 0)."""
    if not isinstance(obj, dict) or limit <= 0:
        return 0
    d = 0
    for k in obj:
        d = max(d, depth(obj[k], limit - 1))
    return d + 1


def copy(obj):
    if isinstance(obj, dict):
        return {k: copy(obj[k]) for k in obj}
    if isinstance(obj, list):
        return [copy(v) for v in obj]
    return obj


def apply_patch(doc, patch):
    """Merge patch into doc in place with the server's semantics: dicts merge, None deletes, anything else replaces."""
    for k in patch:
        v = patch[k]
        if v is None:
            doc.pop(k, None)
        elif isinstance(v, dict):
            cur = doc.get(k)
            if not isinstance(cur, dict):
                cur = doc[k] = {}
            apply_patch(cur, v)
        else:
            doc[k] = copy(v)
    return doc


def coalesce(older, newer):
    """One patch equivalent to sending older then newer, or None when there is none (a dict over a pending delete:
    the delete must reach the server first, or the old fields would survive the merge)."""
    out = copy(older)
    return out if _coalesce_into(out, newer) else None


def _coalesce_into(dst, src):
    for k in src:
        v = src[k]
        cur = dst.get(k, _MISSING)
        if isinstance(v, dict):
            if cur is None:
                return False
            if isinstance(cur, dict):
                if not _coalesce_into(cur, v):
                    return False
                continue
        dst[k] = copy(v)
    return True


class StateManager:
    """Keeps this device's shadow in step with the StateServer: `await sync_full()`, `report({...})`, `on_delta(cb)`."""

    #: reported updates held while offline (each already coalesced as far as is exact); past this the two oldest are
    #: merged even if that loses a pending delete-then-set distinction — the queue must stay bounded on a Pico
    max_pending = 8
    #: nesting depth accepted for a reported update (the server refuses deeper than 6 levels)
    max_depth = 6
    #: attempts after a 409 (refetch, re-apply, retry) before giving up until the next sync
    max_conflict_retries = 3
    #: seconds between full GETs when nothing else happens (catches a missed notification)
    resync_s = 300
    #: seconds before retrying after a failure (doubles up to resync_s)
    retry_s = 5

    def __init__(self, http, auth, url=None):
        self.http = http
        self.auth = auth
        self.url = url
        self.version = None
        self.document = None
        self.desired = {}
        self.reported = {}
        self.delta = {}
        self.online = False
        self.need_full = True
        self.need_fetch = False
        self.conflicts = 0
        self.full_syncs = 0
        self.updates_sent = 0
        self.dropped = 0
        self.last_error = None
        self._pending = []
        self._cbs = []
        self._last_delta = None
        self._event = None
        self._meta = {}
        self._clears = {}  # key -> (overridden desired value, its metadata timestamp)

    # --- the application's side ---------------------------------------------------------------------------------

    def on_delta(self, cb):
        """cb(delta) is called with desired fields that differ from reported (after every full sync, and whenever a
        fetched document brings a new delta). If it returns a non-empty dict (may be async), that is reported."""
        self._cbs.append(cb)

    def report(self, partial):
        """Queue a partial `reported` update (None deletes a field). Never blocks; ValueError for bad input."""
        if not isinstance(partial, dict):
            raise ValueError("reported update must be a dict")
        if depth(partial) > self.max_depth:
            raise ValueError("reported update deeper than %d levels" % self.max_depth)
        if not partial:
            return
        merged = coalesce(self._pending[-1], partial) if self._pending else None
        if merged is not None:
            self._pending[-1] = merged
        else:
            self._pending.append(copy(partial))
            if len(self._pending) > self.max_pending:
                first = self._pending.pop(0)
                self._pending[0] = _force_merge(first, self._pending[0])
                self.dropped += 1
        self._wake()

    def override(self, key, value):
        """The device set top-level `key` to `value` on its own. If the shadow desires something else for it, that
        desired key is cleared with the next update (versioned): the cloud never re-applies the stale value."""
        if key in self.desired and self.desired[key] != value:
            self._clears[key] = (self.desired[key], self._ts(key))
            self._wake()

    def _ts(self, key):
        m = self._meta.get(key)
        return m.get("timestamp") if isinstance(m, dict) else None

    def pending(self):
        """The queued updates (copies), oldest first."""
        return [copy(p) for p in self._pending]

    def notify(self, state_version):
        """A heartbeat said the shadow is at state_version: fetch it if that is not what we hold."""
        if state_version != self.version:
            self.need_fetch = True
            self._wake()

    def disconnected(self):
        """The link went down: the next contact starts with a full GET."""
        self.online = False
        self.need_full = True

    def _wake(self):
        if self._event is not None:
            self._event.set()

    # --- talking to the server ----------------------------------------------------------------------------------

    def _url(self):
        url = self.url or self.auth.services.get("state")
        if not url:
            raise StateError("no state service URL (not registered?)")
        return url

    async def _call(self, method, body=None, timeout_ms=None, query=""):
        for attempt in (0, 1):
            token = await self.auth.ensure_token(self.http)  # may register, which is where the URL comes from
            try:
                r = await self.http.request(method, self._url() + query, json=body, timeout_ms=timeout_ms,
                                            headers={"Authorization": "Bearer " + token})
            except Exception:
                self.disconnected()
                raise
            if r.status == 401 and attempt == 0:
                self.auth.invalidate()  # token revoked or server restarted with a new key: register again
                continue
            return r

    @staticmethod
    def _why(r):
        try:
            e = r.json().get("error")
        except Exception:
            e = None
        return "HTTP %d%s" % (r.status, ": " + e if e else "")

    def _doc(self, r):
        try:
            d = r.json()
        except Exception:
            d = None
        if not isinstance(d, dict) or not isinstance(d.get("state", {}), dict) or "version" not in d:
            raise StateError("state document malformed")
        return d

    async def _apply(self, doc, force):
        st = doc.get("state") or {}
        self.document = doc
        self.version = doc.get("version")
        self.desired = st.get("desired") or {}
        self.reported = st.get("reported") or {}
        self.delta = st.get("delta") or {}
        md = doc.get("metadata")
        md = md.get("desired") if isinstance(md, dict) else None
        self._meta = md if isinstance(md, dict) else {}
        delta = self.delta
        for k in list(self._clears):
            if k in self.desired and (self.desired[k], self._ts(k)) == self._clears[k]:
                if k in delta:  # still the value the device overrode: never applied again
                    delta = copy(delta)
                    del delta[k]
            else:  # cleared, or written again since: applied as usual
                del self._clears[k]
        await self._deliver(delta, force)

    async def _deliver(self, delta, force):
        if not delta:
            self._last_delta = None
            return
        # what was delivered: the values and when each was desired (the same value desired again is a new command)
        seen = (delta, [self._ts(k) for k in sorted(delta)])
        if not force and seen == self._last_delta:
            return  # already acted on (e.g. a refused desired value stays in delta)
        self._last_delta = (copy(delta), seen[1])
        for cb in self._cbs:
            try:
                r = cb(copy(delta))
                if hasattr(r, "send"):  # a coroutine
                    r = await r
                if isinstance(r, dict) and r:
                    self.report(r)
            except Exception as e:  # a faulty handler must not stop the sync loop
                lg = _log()
                if lg:
                    lg.exc("delta callback failed", e)

    async def fetch(self, force=False):
        """GET the document and act on its delta (every delta again when force)."""
        r = await self._call("GET")
        if r.status != 200:
            raise StateError("state fetch: " + self._why(r))
        self.need_fetch = False
        await self._apply(self._doc(r), force)
        return self.document

    async def sync_full(self):
        """What to do on every (re)connect: full GET, deliver the whole delta, then send what was queued offline."""
        await self.fetch(force=True)
        self.online = True
        self.need_full = False
        self.full_syncs += 1
        await self.flush()
        return self.document

    async def flush(self):
        """Send queued reported updates (and desired keys to clear), oldest first. 409 → refetch, re-apply, retry with
        the fresh version."""
        conflicts = 0
        while self._pending or self._clears:
            st = {}
            if self._pending:
                st["reported"] = self._pending[0]
            if self._clears:
                st["desired"] = {k: None for k in self._clears}
            body = {"state": st}
            if self.version is not None:
                body["version"] = self.version
            r = await self._call("POST", body)
            if r.status == 200:
                if self._pending:
                    self._pending.pop(0)
                    self.updates_sent += 1
                await self._apply(self._doc(r), False)
            elif r.status == 409:
                self.conflicts += 1
                conflicts += 1
                if conflicts > self.max_conflict_retries:
                    raise StateError("version conflict persists after %d retries" % self.max_conflict_retries)
                await self.fetch()
            elif r.status in (400, 413, 422):
                if not self._pending:
                    self._clears = {}  # a server that refuses the clear: the next full sync tells the truth
                    continue
                bad = self._pending.pop(0)
                if len(bad) > 1:
                    # possibly several reports coalesced: send its fields one by one, so that one refused field
                    # (too big, too deep) does not take the valid ones down with it
                    for k in bad:
                        self._pending.insert(0, {k: bad[k]})
                    continue
                # the server will never take this update: drop it (logged), keep the rest flowing
                self.dropped += 1
                lg = _log()
                if lg:
                    lg.error("state update refused; dropped", reason=self._why(r), fields=list(bad))
            else:
                raise StateError("state update: " + self._why(r))
        return True

    async def poll(self, wait_s):
        """Blocking query (`?version=N&wait=S`): returns when the shadow changes or after wait_s. Holds the single
        connection meanwhile, so prefer heartbeat notifications (notify()) on a busy device."""
        q = "" if self.version is None else "?version=%d&wait=%d" % (self.version, wait_s)
        r = await self._call("GET", timeout_ms=(wait_s + 10) * 1000, query=q)
        if r.status == 304:
            return False
        if r.status != 200:
            raise StateError("state poll: " + self._why(r))
        before = self.version
        await self._apply(self._doc(r), False)
        return self.version != before

    async def run(self):
        """The supervised task: full sync on (re)connect, then flush reports, fetch on notify, resync now and then."""
        self._event = asyncio.Event()
        backoff = self.retry_s
        while True:
            try:
                if self.need_full:
                    await self.sync_full()
                else:
                    if self.need_fetch:
                        await self.fetch()
                    await self.flush()
                wait = self.resync_s
                backoff = self.retry_s
                self.last_error = None
            except Exception as e:  # HTTPError, StateError, AuthError: stay alive, retry with backoff
                self.last_error = str(e)
                lg = _log()
                if lg:
                    lg.warning("state sync failed", reason=str(e))
                wait = backoff
                backoff = min(backoff * 2, self.resync_s)
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), wait)
            except asyncio.TimeoutError:
                self.need_fetch = True


def _force_merge(older, newer):
    out = copy(older)
    for k in newer:
        v = newer[k]
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _force_merge(out[k], v)
        else:
            out[k] = copy(v)
    return out
