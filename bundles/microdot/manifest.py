# microdot's core, the web framework of the device API. Its extensions (websocket.py, helpers.py, …) stay off the
# board: the firmware's WebSocket stream is its own (iotlib.wsstream) and nothing imports them. The build slims
# microdot.py further (picoiot.build.MICRODOT_SLIM).
metadata(description="microdot core (pinned: pyproject.toml's firmware extra)", version="2.7.0")
package("microdot", files=("__init__.py", "microdot.py"), base_path="$(MICRODOT)")
