# The RelaysController's REST routes: GET /gpio, GET /gpio/<relay> (viewer), POST /gpio/<relay> (operator) with
# {"state": "on"|"off"|"toggle", "pulse_ms"?}. 404 for an unknown relay, 400 for a bad body (docs/device-api.yaml).
from iotlib.web import error, json_body
from iotlib import log as _logmod

_log = _logmod.get("relays")


def install(web, bank):
    """Register the routes on a DeviceWeb for a RelayBank (reloads reconfigure the bank in place)."""

    async def list_all(req):
        return {"relays": [bank.describe(n) for n in bank.names()]}

    async def get_one(req, relay):
        if relay not in bank:
            return error(404, "unknown relay %r" % relay)
        return bank.describe(relay)

    async def post_one(req, relay):
        if relay not in bank:
            return error(404, "unknown relay %r" % relay)
        body = json_body(req)
        for k in body:
            if k not in ("state", "pulse_ms"):
                return error(400, "unknown field %r (expected state, pulse_ms)" % k)
        state = body.get("state")
        if state not in ("on", "off", "toggle"):
            return error(400, "state must be \"on\", \"off\" or \"toggle\"")
        pulse = body.get("pulse_ms")
        try:
            await bank.set(relay, state, pulse)
        except ValueError as e:
            return error(400, str(e))
        _log.info("relay command", relay=relay, state=bank.state(relay), by=(req.g.claims or {}).get("sub"),
                  pulse_ms=pulse)
        return bank.describe(relay)

    web.route("/gpio", "viewer", list_all)
    web.route("/gpio/<relay>", "viewer", get_one)
    web.route("/gpio/<relay>", "operator", post_one, methods=["POST"])
