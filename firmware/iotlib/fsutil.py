# Flash helpers. LittleFS on a Pico has limited write endurance and a reset can strike mid-write: every persistent
# file is written to a temp file and renamed over the old one, so a reader sees the old or the new file, never half.
import os
import json


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def is_dir(path):
    try:
        return bool(os.stat(path)[0] & 0x4000)
    except OSError:
        return False


def makedirs(path):
    if not path or exists(path):
        return
    parent = path.rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""
    if parent and parent != path:
        makedirs(parent)
    try:
        os.mkdir(path)
    except OSError:
        if not is_dir(path):
            raise


def remove(path):
    try:
        os.remove(path)
        return True
    except OSError:
        return False


def write_atomic(path, data):
    """Write data (str or bytes) to path through path.tmp + rename. Raises OSError (e.g. flash full);
    the old file is then left untouched and the temp file removed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
            f.write(data)
        try:
            os.rename(tmp, path)
        except OSError:
            # Some VFS refuse to rename over an existing file: remove the old one first.
            remove(path)
            os.rename(tmp, path)
    except OSError:
        remove(tmp)
        raise


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj))


def read_json(path, default=None):
    """Parsed JSON of path, or default if the file is missing or corrupt (never raises)."""
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return default


def bump_counter(path, reset=False):
    """A counter kept on flash as {"n": int} (temp + rename): +1, returning the new value; with reset, back to 0 (no
    flash write when it already is). A missing or corrupt file counts as 0."""
    v = read_json(path)
    n = v.get("n") if isinstance(v, dict) else None
    n = n if isinstance(n, int) and not isinstance(n, bool) else 0
    if reset:
        if n:
            write_json_atomic(path, {"n": 0})
        return 0
    write_json_atomic(path, {"n": n + 1})
    return n + 1
