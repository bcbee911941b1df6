# SensorsController: the seed's sensor gateway. Samples the configured fields (RP2040 temperature, ADC, BME280/SHT3x)
# through their filters, streams frames over a passive WebSocket at /ws and answers `GET /sensors` with the latest
# snapshot. Fields, interval, filters and stream limits come from config and hot-reload.
#
#   controller = SensorsController(wifi_ssid=…, wifi_password=…, device_id=…, device_key=…,
#                                  service_discovery_url=…)
#   await controller.main()
from iotlib.compat import epoch_ms
from iotlib.device import Device
from iotlib import log as _logmod

_log = _logmod.get("sensors")


class SensorsController(Device):
    device_type = "sensors"
    capabilities = ("sensors", "rest", "ws")

    def __init__(self, wifi_ssid, wifi_password, device_id, device_key, service_discovery_url, **kw):
        Device.__init__(self, wifi_ssid, wifi_password, device_id, device_key, service_discovery_url, **kw)
        self.hub = None
        self.stream = None

    def schema(self):
        s = Device.schema(self)
        s["sampling"] = {"interval_ms": {"type": "int", "min": 10, "max": 3600000},
                         "fields": {"type": "list", "items": {"type": "str", "min": 1, "max": 32}, "max": 16},
                         "sources": {"type": "dict"}}
        s["filters"] = {"type": "dict"}  # per field; checked in depth by iotlib.sensors.section_from_config
        s["ws"] = {"max_clients": {"type": "int", "min": 1, "max": 4},
                   "max_rate_hz": {"type": "number", "min": 0.01, "max": 50}}
        s["i2c"] = {"type": "dict"}
        return s

    def defaults(self):
        d = Device.defaults(self)
        d["sampling"] = {"interval_ms": 1000, "fields": ["temperature", "humidity", "pressure", "cpu_temp"],
                         "sources": {}}
        d["filters"] = {}
        d["ws"] = {"max_clients": 3, "max_rate_hz": 10}
        d["i2c"] = {}
        return d

    def _now_ms(self):
        ts = self.ts
        return ts.now_ms() if ts is not None and ts.synced else epoch_ms()

    def setup_domain(self, config):
        from iotlib.sensors import SensorHub, section_from_config
        self.hub = SensorHub(clock=self._now_ms, on_fault=lambda k, m: self.alarms.fire(k, "warning", m),
                             on_recover=self.alarms.clear, log=_log)
        try:
            self.hub.configure(section_from_config(config))
        except ValueError as e:
            _log.error("sensor config unusable, using defaults", reason=str(e))
            self.hub.configure(section_from_config(self.defaults()))
        for sec in ("sampling", "filters", "i2c"):
            self.cfg.on_change(sec, self._reload)
        from iotlib import metrics
        self._m_value = metrics.gauge("iotlib_sensor_value", "Latest published value of a field (NaN while failing).",
                                      ("field",))
        metrics.gauge_fn("iotlib_sensor_faults", "Sensors failing now.", lambda: len(self.hub.faults))
        metrics.gauge_fn("iotlib_ws_clients", "WebSocket stream clients connected.",
                         lambda: len(self.stream.clients) if self.stream else 0)
        metrics.gauge_fn("iotlib_ws_clients_dropped", "Stream clients dropped as too slow or silent since boot.",
                         lambda: self.stream.dropped if self.stream else 0)
        self.hub.listen(self._export)

    def _export(self, snap):
        values = snap["values"]
        for k in values:
            v = values[k]
            self._m_value.set(float("nan") if v is None else v, field=k)

    def _reload(self, _section):
        from iotlib.sensors import section_from_config
        self.hub.configure(section_from_config(self.cfg.config))  # raises → ConfigManager rolls back

    def _apply_ws(self, ws):
        if self.stream is not None:
            self.stream.max_clients = ws.get("max_clients", 3)
            self.stream.max_rate_hz = ws.get("max_rate_hz", 10)
            self.web.max_connections = self.stream.max_clients + 1  # one socket stays for REST calls

    def reported(self):
        return {"sampling_interval_ms": self.hub.interval_ms, "fields": self.hub.field_names()}

    def telemetry(self):
        # the latest value of each field rides on the heartbeat: no device clock, no extra request or client; costs
        # one small dict per heartbeat
        t = {}
        values = self.hub.values
        for k in values:
            v = values[k]
            if v is not None and v == v:  # a failing sensor (None) or NaN is left out
                t[k] = v
        return t

    def info_extra(self):
        return {"fields": self.hub.field_names(), "interval_ms": self.hub.interval_ms, "samples": self.hub.samples,
                "faults": self.hub.faults, "ws_clients": len(self.stream.clients) if self.stream else 0}

    def routes(self, web):
        from iotlib.wsstream import WSStream
        hub = self.hub

        async def sensors(req):
            snap = hub.snapshot()
            snap["faults"] = hub.faults
            snap["interval_ms"] = hub.interval_ms
            return snap

        web.route("/sensors", "viewer", sensors)
        self.stream = WSStream(web, fields=hub.field_names)
        hub.listen(self.stream.publish)
        self._apply_ws(self.cfg.config["ws"])
        self.cfg.on_change("ws", self._apply_ws)

    def domain_tasks(self, wd):
        wd.supervise("sampler", self.hub.run, critical=False)
