# The device API's policy, on the transport of iotlib.httpd (which reads each request and hands it to _dispatch here):
# every route declares the least role it needs; before its handler runs, the caller is authenticated (Bearer device
# JWT or static token → 401 / 403) and rate limited (a token bucket per authenticated caller, else per client address
# → 429 + Retry-After). Every error answer is JSON {"error": …} (404, 405 with Allow, 413, 400 bad JSON, 500, 503 when
# the heap ran out). Routes are a dict of fixed paths and a list of "<arg>" patterns matched segment by segment (no
# regex). Built in: /health, /ready, /metrics, /info, /reboot. Handlers are coroutines and never block the loop.
import json
from iotlib.compat import asyncio, ticks_ms, ticks_diff, format_exc
from iotlib.auth import RateLimiter, role_at_least
from iotlib.httpd import Server, Response, HANDLED  # noqa: F401 (HANDLED: for handlers that answer themselves)
from iotlib import log as _logmod

_log = _logmod.get("web")


class BadRequest(Exception):
    pass


def error(status, message, headers=None):
    """A JSON error answer for a handler to return."""
    return {"error": message}, status, headers or {}


def json_body(req, required=True):
    """The request body parsed as a JSON object; BadRequest (→ 400) for an empty body when required, invalid JSON or a
    non-object."""
    body = req.body
    if not body:
        if required:
            raise BadRequest("request body must be a JSON object")
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeError):
        raise BadRequest("request body is not valid JSON")
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def client_ip(addr):
    """The client's address as text, a rate-limit key: (ip, port) on lwIP/CPython, a raw sockaddr on the unix port.
    Always a str: the limiter's table also holds callers' `sub`s, and a bytes key beside str keys makes the unix port
    warn "Comparison between bytes and str" on every colliding lookup."""
    if isinstance(addr, (tuple, list)) and addr:
        return addr[0]
    if isinstance(addr, (bytes, bytearray)) and len(addr) >= 8:
        return "%d.%d.%d.%d" % (addr[4], addr[5], addr[6], addr[7])  # sockaddr_in: family(2) port(2) address(4)
    return addr if isinstance(addr, str) else "?"


def bearer_from(req):
    """The token of a request: Authorization: Bearer …, else ?token= (clients that cannot set headers), else a
    Sec-WebSocket-Protocol entry "bearer.<token>" (browsers' WebSocket API can set nothing else)."""
    h = req.headers.get("Authorization")
    if h:
        return h
    if req.in_query(b"token="):
        for pair in req.query().split("&"):
            k, _, v = pair.partition("=")
            if k == "token" and v:
                return _unquote(v)
    for p in (req.headers.get("Sec-WebSocket-Protocol") or "").split(","):
        p = p.strip()
        if p.startswith("bearer."):
            return p[7:]
    return None


def _unquote(s):
    # %XX and + of a query string's value; a malformed escape is kept as it is
    if "%" not in s and "+" not in s:
        return s
    parts = s.replace("+", " ").encode().split(b"%")
    out = bytearray(parts[0])
    for p in parts[1:]:
        try:
            out.append(int(p[:2], 16))
            out += p[2:]
        except ValueError:
            out += b"%" + p
    return out.decode()


def answer(res):
    """A handler's result as a Response, by microdot's rules: a body, (body, status), (body, status, headers),
    (body, headers), a bare status, or a Response."""
    if isinstance(res, Response):
        return res
    if res is None:
        return Response()
    if isinstance(res, int):
        return Response(b"", res)
    if isinstance(res, tuple):
        if isinstance(res[0], int):
            return Response(b"", res[0], res[1] if len(res) > 1 else None)
        if len(res) > 1 and not isinstance(res[1], int):
            return Response(res[0], 200, res[1])
        return Response(res[0], res[1] if len(res) > 1 else 200, res[2] if len(res) > 2 else None)
    return Response(res)


def _match(segs, path):
    """The url args of path under a route's segments ((literal, None) or (None, name) pairs), or None. No regex
    (MicroPython's recurses per character: a 1,000-character path under /gpio/<relay> would end in "maximum recursion
    depth exceeded" and no answer), and a path with the wrong number of segments is not even split."""
    if path.count("/") != len(segs) - 1:
        return None
    args = {}
    i = 0
    for p in path.split("/"):
        lit, name = segs[i]
        i += 1
        if lit is None and p:
            args[name] = p
        elif p != lit:
            return None
    return args


class DeviceWeb(Server):
    #: Per-client token bucket defaults (requests/s sustained, burst); hot-reloadable through configure().
    rate_per_s = 10
    burst = 20

    def __init__(self, verify, info=None, ready=None, on_reboot=None, metrics=None):
        """verify(bearer) → claims with a "role", raising on a bad token (iotlib.auth.AuthManager.verify).
        info() → dict for /info; ready() → (bool, dict) for /ready; on_reboot(): called shortly after POST /reboot
        answered. metrics: an iotlib.metrics registry for /metrics (None: the module's REGISTRY)."""
        Server.__init__(self)
        self._verify = verify
        self._info = info
        self._ready = ready
        self._on_reboot = on_reboot
        self._registry = metrics
        self.started_ms = ticks_ms()
        self._limiter = None
        self._exact = {}  # path without <args> -> {method: handler}, filled by route()
        self._patterns = []  # [(segments, {method: handler})] for paths with <args>, filled by route()
        if metrics is not False:
            from iotlib import metrics as m
            reg = metrics or m.REGISTRY
            self._requests = reg.counter("iotlib_http_requests_total", "Device API answers by status code.", ("code",))
            self._refused = reg.counter("iotlib_http_refused_connections_total",
                                        "Connections answered 503 at the connection cap.")
            reg.gauge_fn("iotlib_http_connections", "Device API connections open now.", lambda: self.active)
        self.route("/health", None, self._health)
        self.route("/ready", None, self._ready_h)
        self.route("/metrics", "viewer", self._metrics_h)
        self.route("/info", "viewer", self._info_h)
        self.route("/reboot", "admin", self._reboot_h, methods=["POST"])

    def configure(self, api=None):
        """Apply an "api" config section: {"rate_per_s", "burst"} (static tokens are the verifier's business)."""
        api = api or {}
        rate = api.get("rate_per_s", self.rate_per_s)
        burst = api.get("burst", self.burst)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError("api.rate_per_s: must be a number > 0")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ValueError("api.burst: must be an integer >= 1")
        self._limiter = RateLimiter(rate, burst)

    # --- routing with auth -----------------------------------------------------------------------------------------
    def route(self, path, role, handler, methods=None):
        """Register coroutine handler(req, **url_args) at path, callable by role or above (None: public, still rate
        limited; False: the handler checks for itself with check())."""
        web = self

        async def guarded(req, **kw):
            denied = web.check(req, role) if role is not False else None
            if denied is not None:
                return answer(denied)
            try:
                return answer(await handler(req, **kw))
            except BadRequest as e:
                return answer(error(400, str(e)))
        methods = methods or ["GET"]
        if "<" in path:
            # "<name>": one non-empty segment, passed as a string (the device's routes need no more)
            key = tuple((None, p[1:-1]) if p[:1] == "<" else (p, None) for p in path.split("/"))
            for k, by_method in self._patterns:
                if k == key:
                    break
            else:
                by_method = {}
                self._patterns.append((key, by_method))
        else:
            by_method = self._exact.setdefault(path, {})
        for m in methods:
            by_method[m] = guarded
        return guarded

    def check(self, req, role):
        """None when req may go ahead for role, else the error answer (429, 401, 403). Sets req.g.claims.

        Rate limits: a caller with a valid token has a bucket of its own (its `sub`); everything else — public routes,
        no token, a bad token — shares its address's bucket. Anonymous calls (/health probes, a scanner) cannot use up
        an operator's requests from the same address, and a flood of bad tokens is still throttled."""
        if self._limiter is None:
            self.configure()
        req.g.claims = None
        if role is None:
            return self._limit(client_ip(req.client_addr))
        bearer = bearer_from(req)
        if not bearer:
            return self._limit(client_ip(req.client_addr)) or error(401, "missing token", {"WWW-Authenticate": "Bearer"})
        try:
            claims = self._verify(bearer)
        except Exception as e:  # AuthError, or anything else a verifier raises: never a 500
            return self._limit(client_ip(req.client_addr)) or error(401, "invalid token: %s" % e,
                                                                     {"WWW-Authenticate": "Bearer"})
        denied = self._limit(claims.get("sub") or "?")
        if denied is not None:
            return denied
        if not role_at_least(claims.get("role"), role):
            return error(403, "role %s required" % role)
        req.g.claims = claims
        return None

    def _limit(self, key):
        ok, wait = self._limiter.allow(key)
        return None if ok else error(429, "rate limit exceeded", {"Retry-After": str(max(1, wait))})

    def _find(self, req):
        """The handler of req's route, or (404, None), or (405, the path's methods for Allow). A fixed path is one
        dict lookup, a path with <args> is matched segment by segment (_match)."""
        path = req.path
        f = self._exact.get(path)
        if f is None:
            for segs, by in self._patterns:
                args = _match(segs, path)
                if args is not None:
                    req.url_args = args
                    f = by
                    break
        if f is None:
            return 404, None
        m = req.method
        h = f.get("GET" if m == "HEAD" else m)  # (no OPTIONS: no browser calls the device cross-origin)
        if h is None:  # RFC 9110: a 405 names the methods the path has
            return 405, ", ".join(("HEAD",) + tuple(f) if "GET" in f else f)
        return h

    async def _dispatch(self, req):
        if req.content_length > self.max_body:
            return answer(error(413, "request body too large (max %d bytes)" % self.max_body))
        f = self._find(req)
        if isinstance(f, tuple):
            s, allow = f
            return answer(error(s, "not found") if allow is None else error(s, "method not allowed", {"Allow": allow}))
        try:
            return await f(req, **req.url_args)
        except MemoryError:  # a retry can succeed: what the handler held is garbage now
            self._oom(req.path[:64])
            return answer(error(503, "out of memory", {"Retry-After": "1"}))
        except Exception as e:
            _log.error("handler failed", path=req.path, error=repr(e))
            return answer(error(500, "internal server error"))

    # --- built-in routes ---------------------------------------------------------------------------------------------
    def uptime_s(self):
        return ticks_diff(ticks_ms(), self.started_ms) // 1000

    async def _health(self, req):
        return {"status": "ok", "uptime_s": self.uptime_s()}

    async def _ready_h(self, req):
        ok, detail = self._ready() if self._ready else (True, {})
        detail = dict(detail)
        detail["ready"] = ok
        return detail, 200 if ok else 503

    async def _metrics_h(self, req):
        from iotlib import metrics as m
        reg = self._registry or m.REGISTRY
        return reg.render_chunks(), 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}

    async def _info_h(self, req):
        return self._info() if self._info else {}

    async def _reboot_h(self, req):
        if self._on_reboot is None:
            return error(503, "reboot not available")
        _log.warning("reboot requested", by=(req.g.claims or {}).get("sub"))
        asyncio.create_task(self._reboot_later())
        return {"rebooting": True}, 202

    async def _reboot_later(self):
        await asyncio.sleep(0.2)  # let the 202 reach the client first
        try:
            r = self._on_reboot()
            if hasattr(r, "send"):
                await r
        except Exception as e:  # SystemExit (a simulated reset) is not an Exception: it goes through
            _log.error("reboot failed", error=format_exc(e))
