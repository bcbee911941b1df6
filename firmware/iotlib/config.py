# Device configuration: defaults + a compact schema, versioned, applied through per-section hot-reload callbacks with
# rollback, persisted as last-known-good, fetched from the ConfigurationServer (docs/protocol.md section 3).
#
# Schema: a *section* is a dict {field: spec}; a *leaf* is a dict whose "type" is a string:
#   {"type": "int"|"float"|"number"|"bool"|"str"|"list"|"dict"|"any",
#    "required": bool, "min": n, "max": n (value, or length for str/list), "enum": [...], "items": spec (list items,
#    a leaf or a section), "nullable": bool}
# A section may hold "*": spec to accept other keys (a map: {"relays": {"*": {...}}}); any other unknown key is an
# error, so a typo ("intreval_ms") is refused instead of silently ignored. "float" accepts ints; bool is never a number.
from . import fsutil
from . import log

_log = log.get("config")


class ConfigError(ValueError):
    """An invalid schema, defaults or configuration; str(e) names the paths and problems."""


#: Most problems reported by one validation (the first ones; a report must stay small).
MAX_ERRORS = 8
#: Longest reason sent in a report (characters; the control plane accepts up to 512).
MAX_REASON = 500


# One function instead of a table of lambdas: a lambda costs a function object + its code in RAM.
def _type_ok(t, v):
    """True/False: whether v has schema type t; None: t is not a schema type."""
    if t == "any":
        return True
    if t == "bool":
        return isinstance(v, bool)
    if t == "str":
        return isinstance(v, str)
    if t == "list":
        return isinstance(v, list)
    if t == "dict":
        return isinstance(v, dict)
    num = not isinstance(v, bool)  # bool is never a number
    if t == "int":
        return num and isinstance(v, int)
    if t == "float" or t == "number":
        return num and isinstance(v, (int, float))
    return None


def _is_leaf(spec):
    return isinstance(spec.get("type"), str)


def _type_name(v):
    if v is None:
        return "null"
    return type(v).__name__  # int, float, str, list, dict, bool: the schema's own names


def _join(path, key):
    return key if not path else path + "." + key


def _check_leaf(spec, v, path, errs):
    if v is None:
        if not spec.get("nullable"):
            errs.append("%s: must not be null" % path)
        return
    t = spec["type"]
    ok = _type_ok(t, v)
    if ok is None:
        raise ConfigError("%s: unknown schema type %r" % (path, t))
    if not ok:
        errs.append("%s: expected %s, got %s" % (path, t, _type_name(v)))
        return
    enum = spec.get("enum")
    if enum is not None and v not in enum:
        errs.append("%s: must be one of %s" % (path, ", ".join(str(e) for e in enum)))
        return
    if t in ("str", "list"):
        size, what = len(v), "length "
    elif t in ("int", "float", "number"):
        size, what = v, ""
    else:
        size = None
    if size is not None:
        lo = spec.get("min")
        hi = spec.get("max")
        if lo is not None and size < lo:
            errs.append("%s: %smust be >= %s" % (path, what, lo))
        elif hi is not None and size > hi:
            errs.append("%s: %smust be <= %s" % (path, what, hi))
    items = spec.get("items")
    if t == "list" and items is not None:
        for i, item in enumerate(v):
            _check(items, item, "%s[%d]" % (path, i), errs)
            if len(errs) >= MAX_ERRORS:
                return


def _check_section(schema, v, path, errs):
    if not isinstance(v, dict):
        errs.append("%s: expected section, got %s" % (path or "config", _type_name(v)))
        return
    for key, spec in schema.items():
        if key == "*":
            continue
        if key in v:
            _check(spec, v[key], _join(path, key), errs)
        elif _is_leaf(spec) and spec.get("required"):
            errs.append("%s: required" % _join(path, key))
        elif not _is_leaf(spec):
            _check_section(spec, {}, _join(path, key), errs)  # a missing section: its required fields are missing
        if len(errs) >= MAX_ERRORS:
            return
    other = schema.get("*")
    for key in v:
        if key in schema and key != "*":
            continue
        if not isinstance(key, str):
            errs.append("%s: keys must be strings" % (path or "config"))
        elif other is None:
            errs.append("%s: unknown key" % _join(path, key))
        else:
            _check(other, v[key], _join(path, key), errs)
        if len(errs) >= MAX_ERRORS:
            return


def _check(spec, v, path, errs):
    if not isinstance(spec, dict):
        raise ConfigError("%s: schema entry must be a dict" % path)
    if _is_leaf(spec):
        _check_leaf(spec, v, path, errs)
    else:
        _check_section(spec, v, path, errs)


def validate(schema, cfg):
    """A list of "path: problem" strings (empty when cfg is valid). Raises ConfigError for a broken schema."""
    errs = []
    _check_section(schema, cfg, "", errs)
    return errs[:MAX_ERRORS]


def copy(v):
    if isinstance(v, dict):
        return {k: copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [copy(x) for x in v]
    return v


def merge(base, over):
    """A deep copy of base with over merged in: objects merge key by key, anything else replaces."""
    out = copy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy(v)
    return out


def merge_sections(schema, base, over):
    """merge() guided by the schema: sections merge key by key, but a map ("*") or a leaf (a "dict" one too) is
    taken from over whole. The control plane sends the effective config, so a key it removed (a relay taken out of
    service by a null override) must not come back from the device's defaults."""
    out = copy(base)
    for k, v in over.items():
        spec = schema.get(k)
        if (isinstance(v, dict) and isinstance(out.get(k), dict) and isinstance(spec, dict) and not _is_leaf(spec)
                and "*" not in spec):
            out[k] = merge_sections(spec, out[k], v)
        else:
            out[k] = copy(v)
    return out


class ConfigManager:
    """The device's configuration: `config` (dict) at `version` (int; 0 = built-in defaults)."""

    #: Name of the persisted last-known-good file when `path` is a directory (see __init__).
    FILE = "config.json"

    def __init__(self, schema, defaults, path=None):
        """path: the last-known-good JSON file on flash (None: nothing persisted)."""
        errs = validate(schema, defaults)
        if errs:
            raise ConfigError("defaults do not match the schema: " + "; ".join(errs))
        self.schema = schema
        self.defaults = copy(defaults)
        self.config = copy(defaults)
        self.version = 0
        self.path = path
        self._callbacks = {}  # section -> [cb]
        self.etag = None  # what the server called the document we last processed (applied or rejected)
        self.rejected = None  # (version, reason) of the last refused document
        self._report = None  # a report the server has not acknowledged yet
        self.applied = 0
        self.failures = 0

    def on_change(self, section, cb):
        """cb(new_section_value) runs when `section` changes; raising refuses the whole change (rolled back)."""
        self._callbacks.setdefault(section, []).append(cb)

    def section(self, name):
        return self.config.get(name)

    def check(self, cfg):
        """(merged, errors): cfg merged over the defaults (sections only: see merge_sections), and what is wrong."""
        if not isinstance(cfg, dict):
            return None, ["config: expected section, got %s" % _type_name(cfg)]
        merged = merge_sections(self.schema, self.defaults, cfg)
        return merged, validate(self.schema, merged)

    def apply(self, cfg, version=None):
        """Validate cfg (merged over the defaults) and switch to it, calling the callbacks of the sections that
        changed. Returns (ok, reason). On a validation error nothing changes; when a callback raises, every section
        already switched is switched back (its callbacks called with the old value) and the old config stays; a
        MemoryError is raised again after that (the heap ran out, the config is not at fault)."""
        merged, errs = self.check(cfg)
        if errs:
            reason = "; ".join(errs)
            self.failures += 1
            _log.warning("config rejected", version=version, reason=reason)
            return False, reason
        old, old_version = self.config, self.version
        changed = [k for k in merged if merged[k] != old.get(k)] + [k for k in old if k not in merged]
        changed.sort()
        self.config = merged
        self.version = old_version if version is None else version
        done = []
        for sec in changed:
            try:
                done.append(sec)
                self._call(sec, merged.get(sec))
            except Exception as e:
                self.config, self.version = old, old_version
                self._rollback(done, old)
                if isinstance(e, MemoryError):  # the heap, not the config: not rejected, the next fetch tries again
                    raise
                reason = "%s: hot-reload failed: %s" % (sec, log.exc_summary(e))
                self.failures += 1
                _log.error("config rolled back", version=version, reason=reason)
                return False, reason
        self.applied += 1
        if changed or version != old_version:
            self._persist()
        _log.info("config applied", version=self.version, sections=changed)
        return True, "applied" if changed else "unchanged"

    def _call(self, sec, value):
        for cb in self._callbacks.get(sec, ()):
            cb(value)

    def _rollback(self, done, old):
        for sec in done:
            try:
                self._call(sec, old.get(sec))
            except Exception as e:  # keep restoring the others; the device runs on what it has
                _log.error("rollback callback failed", section=sec, reason=log.exc_summary(e))

    def _persist(self):
        if not self.path:
            return
        try:
            fsutil.write_json_atomic(self.path, {"version": self.version, "config": self.config})
        except OSError as e:
            _log.error("cannot persist config", path=self.path, reason=log.exc_summary(e))

    def load(self):
        """Boot: take the last-known-good config from flash (callbacks are not called: construct the components
        after load() and give them `config`). A missing file keeps the defaults; a corrupt or invalid one keeps the
        defaults with a log line. Returns True when a stored config was loaded."""
        if not self.path or not fsutil.exists(self.path):
            return False
        doc = fsutil.read_json(self.path)
        problem = None
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            problem = "not a config document (corrupt file?)"
        elif not isinstance(doc.get("version"), int) or isinstance(doc.get("version"), bool):
            problem = "version: expected int"
        else:
            merged, errs = self.check(doc["config"])
            if errs:
                problem = "; ".join(errs)
        if problem:
            _log.error("stored config unusable, using defaults", path=self.path, reason=problem)
            return False
        self.config = merged
        self.version = doc["version"]
        self.etag = '"%d"' % self.version
        return True

    async def fetch(self, http, url, token, wait=None):
        """One round with the ConfigurationServer: GET (If-None-Match / blocking ?version=&wait=), apply, report.
        Returns (changed, reason). Transport failures raise iotlib.http.HTTPError (the caller backs off)."""
        if self._report is not None:
            await self._send_report(http, url, token)
        headers = {"Authorization": "Bearer " + token}
        etag = self.etag or ('"%d"' % self.version if self.version else None)
        if etag:
            headers["If-None-Match"] = etag
        u = url
        kw = {}
        if wait is not None:
            u = "%s%sversion=%d&wait=%d" % (url, "&" if "?" in url else "?", self._seen_version(), wait)
            # the server holds a blocking query up to `wait` s: the client must not give up first
            need = (wait + 10) * 1000
            if getattr(http, "timeout_ms", need) < need:
                kw["timeout_ms"] = need
        resp = await http.request("GET", u, headers=headers, **kw)
        if resp.status == 304:
            return False, "not modified"
        if resp.status != 200:
            _log.warning("config fetch failed", status=resp.status)
            return False, "HTTP %d" % resp.status
        try:
            ok, reason = self._take(resp)
        except MemoryError:
            # Parsing or applying it ran the heap out: the old config stays in force (apply rolled back what it had
            # switched), the version is neither applied nor rejected, and the next fetch (the etag unchanged) tries
            # again once the heap has room.
            resp = None
            from iotlib import metrics
            metrics.memory_error("config")
            _log.error("config not applied: out of memory")
            return False, "out of memory"
        if self._report is not None:
            await self._send_report(http, url, token)
        return ok, reason

    def _take(self, resp):
        try:
            doc = resp.json()
        except MemoryError:
            raise
        except Exception:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), int) or isinstance(doc.get("version"), bool):
            _log.warning("config response malformed", status=resp.status)
            return False, "malformed response"
        version = doc["version"]
        new_etag = resp.headers.get("etag") or '"%d"' % version
        if self.rejected is not None and self.rejected[0] == version:
            self.etag = new_etag
            return False, "already rejected: " + self.rejected[1]
        ok, reason = self.apply(doc.get("config"), version)
        self.etag = new_etag
        if ok:
            self.rejected = None
            self._report = {"version": version, "status": "applied"}
        else:
            self.rejected = (version, reason)
            self._report = {"version": version, "status": "rejected", "reason": reason[:MAX_REASON]}
        return ok, reason

    def _seen_version(self):
        return self.rejected[0] if self.rejected is not None else self.version

    async def _send_report(self, http, url, token):
        """POST <config>/report; kept for the next fetch when it does not get through."""
        report = self._report
        try:
            resp = await http.request("POST", url.split("?", 1)[0] + "/report", json=report,
                                      headers={"Authorization": "Bearer " + token})
            status = resp.status
        except Exception as e:
            _log.warning("config report not sent", reason=log.exc_summary(e))
            return False
        if 200 <= status < 300:
            if self._report is report:
                self._report = None
            return True
        _log.warning("config report refused", status=status)
        return False
