"""tests/support/waits.metric reads one sample of a Prometheus text exposition, as prometheus_client writes it: the
`# HELP`/`# TYPE` lines that name the metric are not samples."""
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from support.waits import metric


def _client() -> httpx.Client:
    reg = CollectorRegistry()
    Counter("picoiot_misses", "cache misses", registry=reg).inc(3)
    g = Gauge("picoiot_waiting", "held long-polls", ["kind"], registry=reg)
    g.labels("heartbeat").set(2)
    text = generate_latest(reg)
    return httpx.Client(base_url="http://cp.test", transport=httpx.MockTransport(lambda req: httpx.Response(200, content=text)))


def test_a_sample_is_read_past_its_help_and_type_lines():
    with _client() as c:
        assert metric(c, "picoiot_misses_total") == 3.0
        assert metric(c, "picoiot_waiting", 'kind="heartbeat"') == 2.0
        assert metric(c, "picoiot_waiting", kind="heartbeat") == 2.0
        assert metric(c, "picoiot_waiting") == 0.0  # no unlabelled sample
        assert metric(c, "picoiot_absent") == 0.0
