# A blocking config query longer than the HTTP client's default timeout must not turn into a transport error: the
# server holds it for `wait` seconds by design (protocol §3), so the client has to allow for that.
from iotlib.config import ConfigManager
from it_device import Device, relays_config


async def main(ctl):
    p = ctl.ask("setup")
    dev = Device(p)
    await dev.register()
    cm = ConfigManager(*relays_config())
    url = dev.url("config")
    changed, reason = await cm.fetch(dev.http, url, dev.token)
    assert changed, reason
    dev.http.timeout_ms = 500  # the client's default for ordinary calls: shorter than the wait below
    changed, reason = await cm.fetch(dev.http, url, dev.token, wait=1)  # nothing changes: 304 after 1 s
    assert (changed, reason) == (False, "not modified"), (changed, reason)
    return {"version": cm.version}
