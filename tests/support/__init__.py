"""The test harness shared by the control-plane, device and integration tests and the benches.

- `pg`: the PostgreSQL the suite uses (`PICOIOT_TEST_PG`), a schema per test or per server;
- `live`: the control plane in the test's own process, through ASGI without a socket (`InProcessServer`) or under
  uvicorn on 127.0.0.1 (`LiveServer`), with a device's registration;
- `servers`: `picoiot server` as a real subprocess (`ServerProcess`), on `picoiot.procs.ServerChild`, which is also
  what `picoiot demo`/`sim` run; simulated devices are `picoiot.procs.DeviceChild` (see tests/devices/devtest.py);
- `waits`: bounded polling (`wait_until`) and one sample of a server's /metrics (`metric`).

The per-suite modules (tests/controlplane/cptest.py, tests/devices/devtest.py, tests/integration/ittest.py) keep
their names and re-export what they take from here.
"""
