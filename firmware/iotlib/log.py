# Structured logging: one JSON object per line {ts, level, module, msg, ...fields} to the console and/or a rotating
# file on flash. Secrets are masked by key name and by value pattern before anything is written. Writing never raises
# into the caller: a full flash drops the line and counts it in `dropped`.
import sys
import json
from .compat import const, epoch_ms, format_exc, ticks_ms, _clk
from . import fsutil

DEBUG = const(10)
INFO = const(20)
WARNING = const(30)
ERROR = const(40)
CRITICAL = const(50)

# Level n*10 is named _NAMES[n - 1] (a tuple costs less RAM than two dicts).
_NAMES = ("debug", "info", "warning", "error", "critical")

MASK = "***"
#: Longest string value kept in a line (longer ones are cut with "..."): bounds one line's RAM and flash.
MAX_STR = 256
#: Longest traceback kept by Logger.exc (its tail: the innermost frames and the exception itself).
MAX_TRACEBACK = 1024
#: Deepest nesting of fields walked by mask(); deeper values become "..." (the Pico's C stack is small).
MAX_DEPTH = 6

# A key is secret when its lower-cased name contains one of these (substring match: "wifi_password", "api_token").
_SECRET_WORDS = ("password", "passwd", "secret", "token", "authorization", "cookie", "credential", "signature",
                 "psk", "private")
# The scanner works on the text's UTF-8 bytes: indexing bytes gives ints, while indexing a str makes a one-character
# string that MicroPython interns for good (every distinct character ever logged would stay in the qstr pool).
_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NAMECHARS = _B64URL  # [A-Za-z0-9_-] is also what a key=value name is made of
# A credential ends at whitespace or at a delimiter of the text around it.
_STOP = b" \t\r\n\"',;)]}&"
_QUOTES = b"\"'"
_SCHEMES = (b"bearer", b"basic", b"digest", b"token")

dropped = 0  # lines lost because a sink failed (full flash, no console)
written = 0  # lines written to the file sink


def is_secret_key(name):
    n = name.lower()
    for w in _SECRET_WORDS:
        if w in n:
            return True
    # "key" alone or as a suffix (device_key, api-key, apikey) but not "keys", "keyboard" or "monkey".
    return n == "key" or n.endswith("_key") or n.endswith("-key") or n.endswith("apikey")


def _jwt_end(s, i, n):
    """End of a JWT starting at s[i] ("eyJ..." is base64url of '{"'), or -1 if the run there is not one (s: bytes)."""
    k = i
    while k < n and (s[k] in _B64URL or s[k] == 46):  # 46: "."
        k += 1
    parts = s[i:k].split(b".")
    if len(parts) == 4 and parts[3] == b"":  # a sentence's full stop after the token
        parts.pop()
        k -= 1
    if len(parts) == 3 and len(parts[0]) >= 4 and parts[1]:
        return k
    return -1


def _word_end(s, j, n):
    while j < n and s[j] not in _STOP:
        j += 1
    return j


def _secret_value(s, i, n):
    """For a "=" or ":" at s[i] after a secret name (token=..., "password": "...", Authorization: Basic ...),
    the (start, end) of the value to mask, else None (s: bytes)."""
    b = i
    if b > 0 and s[b - 1] in _QUOTES:
        b -= 1
    e = b
    while b > 0 and s[b - 1] in _NAMECHARS:
        b -= 1
    if b == e or not is_secret_key(s[b:e].decode()):
        return None
    j = i + 1
    while j < n and s[j] == 32:  # " "
        j += 1
    if j < n and s[j] in _QUOTES:
        j += 1
    k = _word_end(s, j, n)
    if k == j:
        return None
    if k < n and s[k] == 32 and s[j:k].lower() in _SCHEMES:
        j = k + 1  # "Authorization: Basic <credential>": the credential is the secret
        k = _word_end(s, j, n)
        if k == j:
            return None
    return j, k


def mask_text(s):
    """s with Bearer credentials, JWTs and secret=value / "secret": "value" pairs replaced by ***.
    Returns s itself (no allocation) when nothing can match."""
    if "eyJ" not in s and "earer" not in s and "EARER" not in s and "=" not in s and ":" not in s:
        return s
    t = s.encode()
    out = None
    n = len(t)
    i = 0
    start = 0
    while i < n:
        c = t[i]
        span = None
        if (c == 66 or c == 98) and t[i:i + 7].lower() == b"bearer " and (i == 0 or t[i - 1] not in _NAMECHARS):
            j = i + 7  # 66, 98: "B", "b"
            while j < n and t[j] == 32:
                j += 1
            k = _word_end(t, j, n)
            if k > j:
                span = (j, k)
        elif c == 101 and t.startswith(b"eyJ", i) and (i == 0 or t[i - 1] not in _B64URL):  # 101: "e"
            k = _jwt_end(t, i, n)
            if k > 0:
                span = (i, k)
        elif (c == 61 or c == 58) and i + 1 < n:  # "=", ":"
            span = _secret_value(t, i, n)
        if span is None:
            i += 1
            continue
        if out is None:
            out = []
        out.append(t[start:span[0]])
        out.append(b"***")
        start = i = span[1]
    if out is None:
        return s
    out.append(t[start:])
    return b"".join(out).decode()


def _short(s, limit):
    return s if len(s) <= limit else s[:limit - 3] + "..."


def mask(obj, depth=0):
    """A JSON-safe copy of obj with secrets masked: values under secret key names become ***, strings are scanned for
    Bearer tokens, JWTs and secret=value pairs, long strings are cut, bytes and unknown objects become strings."""
    if obj is None or obj is True or obj is False or isinstance(obj, int):
        return obj
    if isinstance(obj, str):
        return _short(mask_text(_short(obj, 4 * MAX_STR)), MAX_STR)
    if isinstance(obj, float):
        # nan and inf are not JSON (MicroPython writes them bare): send them as strings.
        return obj if obj - obj == 0 else str(obj)
    if depth >= MAX_DEPTH:
        return "..."
    if isinstance(obj, dict):
        # Copy only when something changes: most records carry nothing to mask, and a copy per line is heap churn.
        d = None
        for k, v in obj.items():
            if not isinstance(k, str):
                return {str(k2): v2 for k2, v2 in mask({str(k2): v2 for k2, v2 in obj.items()}, depth).items()}
            if is_secret_key(k) and v is not None and v != "":
                m = MASK
            elif k == "traceback" and isinstance(v, str):
                # A traceback's last line names the exception: keep the tail, not the head.
                m = mask_text(v)
                if len(m) > MAX_TRACEBACK:
                    m = "..." + m[len(m) - MAX_TRACEBACK + 3:]
            else:
                m = mask(v, depth + 1)
            if m is not v:
                if d is None:
                    d = dict(obj)
                d[k] = m
        return obj if d is None else d
    if isinstance(obj, list):
        out = None
        for i, v in enumerate(obj):
            m = mask(v, depth + 1)
            if m is not v:
                if out is None:
                    out = list(obj)
                out[i] = m
        return obj if out is None else out
    if isinstance(obj, tuple):
        return mask(list(obj), depth)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "<%d bytes>" % len(obj)  # raw bytes may be key material: never dumped
    return mask(str(obj))


class FileSink:
    """Appends lines to path; when it would pass max_bytes, rotates path -> path.1 -> ... -> path.<backups> (the
    oldest removed), so the log takes at most about max_bytes * (backups + 1) of flash."""

    #: Default size of the live file before it rotates (bytes, counted as characters: JSON lines are ASCII-escaped
    #: on CPython, UTF-8 on MicroPython, so non-ASCII text may pass it slightly).
    max_bytes = 16 * 1024
    #: Default number of rotated files kept (retention); older ones are deleted.
    backups = 2

    def __init__(self, path, max_bytes=None, backups=None):
        self.path = path
        if max_bytes is not None:
            self.max_bytes = max_bytes
        if backups is not None:
            self.backups = backups
        self.size = -1  # unknown until the first write
        self.prune()

    def prune(self):
        """Retention: delete rotated files beyond `backups` (left over from a configuration that kept more)."""
        i = self.backups + 1
        while fsutil.remove("%s.%d" % (self.path, i)):
            i += 1

    def rotate(self):
        p = self.path
        fsutil.remove("%s.%d" % (p, self.backups))
        for i in range(self.backups - 1, 0, -1):
            if fsutil.exists("%s.%d" % (p, i)):
                fsutil.os.rename("%s.%d" % (p, i), "%s.%d" % (p, i + 1))
        if self.backups > 0:
            fsutil.os.rename(p, p + ".1")
        else:
            fsutil.remove(p)
        self.size = 0

    def write(self, line):
        """Append one line; raises OSError (e.g. flash full) with nothing half-counted."""
        if self.size < 0:
            try:
                self.size = fsutil.os.stat(self.path)[6]
            except OSError:
                self.size = 0
        n = len(line) + 1
        if self.size > 0 and self.size + n > self.max_bytes:
            self.rotate()
        # Open, append, close per line: the line is on flash when write() returns, even if a reset follows.
        f = open(self.path, "a")
        try:
            f.write(line)
            f.write("\n")
        finally:
            f.close()
        self.size += n


# The global settings, as module globals (a class per setting holder costs RAM for nothing).
_level = INFO
_console = None  # a stream with .write(), or None
_sink = None  # FileSink or None
_loggers = {}


def level_value(level):
    if isinstance(level, int):
        return level
    name = str(level).lower()
    if name not in _NAMES:
        raise ValueError("unknown log level: %s" % level)
    return (_NAMES.index(name) + 1) * 10


def configure(level="info", console=True, path=None, max_bytes=None, backups=None):
    """Set the global level and the sinks. console: True (stdout), False, or any object with write(str).
    path: the log file on flash (None: no file). Safe to call again (e.g. from a config hot-reload callback)."""
    global _level, _console, _sink
    _level = level_value(level)
    _console = sys.stdout if console is True else (console or None)
    if path is None:
        _sink = None
    else:
        d = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            fsutil.makedirs(d)
        except OSError:
            pass  # the first write fails and is counted in `dropped`
        _sink = FileSink(path, max_bytes, backups)


def set_level(level):
    """Change the global level, keeping the sinks (a config hot-reload must not drop the board's log file); a logger
    nobody configured yet writes to the console, as configure() does by default."""
    global _level, _console
    _level = level_value(level)
    if _console is None and _sink is None:
        _console = sys.stdout


_ENVELOPE = ("ts", "level", "module", "msg")


def _line(level, module, msg, fields):
    # Few allocations per line: the message, the fields as one json.dumps (masking copies only what it changes)
    # and the joined line.
    for k in _ENVELOPE:
        if k in fields:  # never let a field overwrite the envelope
            fields = {("_" + k2 if k2 in _ENVELOPE else k2): v for k2, v in fields.items()}
            break
    name = _NAMES[level // 10 - 1] if level % 10 == 0 and DEBUG <= level <= CRITICAL else "info"
    # before the first time sync a board's clock reads 2021: such a line says so (ts null, ms since boot) instead
    head = '{"ts":%s,"level":"%s","module":%s,"msg":%s' % (
        str(epoch_ms()) if _clk[2] else 'null,"up_ms":%d' % ticks_ms(), name, json.dumps(module), json.dumps(mask(msg if isinstance(msg, str) else str(msg))))
    if not fields:
        return head + "}"
    body = json.dumps(mask(fields))
    return "%s,%s" % (head, body[1:])


def emit(level, module, msg, fields):
    global dropped, written
    console, sink = _console, _sink
    if console is None and sink is None:
        return
    try:
        line = _line(level, module, msg, fields)
    except Exception:  # a field whose str() fails must not take the caller down
        line = '{"ts":%d,"level":"error","module":%s,"msg":"unloggable record"}' % (epoch_ms(), json.dumps(module))
    if console is not None:
        try:
            console.write(line)
            console.write("\n")
        except Exception:
            dropped += 1
    if sink is not None:
        try:
            sink.write(line)
            written += 1
        except Exception:  # OSError (ENOSPC, EIO) on a full or failing flash
            dropped += 1
            sink.size = -1  # re-read the real size next time: the failed write may have left part of a line


class Logger:
    def __init__(self, module):
        self.module = module
        self.level = None  # None: the global level from configure()

    def set_level(self, level):
        self.level = None if level is None else level_value(level)

    def enabled(self, level):
        return level >= (_level if self.level is None else self.level)

    def log(self, level, msg, **fields):
        if self.enabled(level):
            emit(level, self.module, msg, fields)

    def debug(self, msg, **fields):
        if self.enabled(DEBUG):
            emit(DEBUG, self.module, msg, fields)

    def info(self, msg, **fields):
        if self.enabled(INFO):
            emit(INFO, self.module, msg, fields)

    def warning(self, msg, **fields):
        if self.enabled(WARNING):
            emit(WARNING, self.module, msg, fields)

    def error(self, msg, **fields):
        if self.enabled(ERROR):
            emit(ERROR, self.module, msg, fields)

    def critical(self, msg, **fields):
        if self.enabled(CRITICAL):
            emit(CRITICAL, self.module, msg, fields)

    def exc(self, msg, exc, **fields):
        """Log exc at error level with its type, message and traceback (masked, tail kept up to MAX_TRACEBACK)."""
        if not self.enabled(ERROR):
            return
        fields["error"] = exc_summary(exc)
        fields["traceback"] = traceback_tail(exc, MAX_TRACEBACK)
        emit(ERROR, self.module, msg, fields)


def exc_summary(exc):
    s = str(exc)
    return type(exc).__name__ + (": " + s if s else "")


def traceback_tail(exc, limit):
    """The masked traceback of exc, cut to its last `limit` characters."""
    try:
        tb = mask_text(format_exc(exc))
    except Exception:
        tb = exc_summary(exc)
    return tb if len(tb) <= limit else "..." + tb[len(tb) - limit + 3:]


def get(module):
    lg = _loggers.get(module)
    if lg is None:
        lg = _loggers[module] = Logger(module)
    return lg


def stats():
    return {"dropped": dropped, "written": written}
