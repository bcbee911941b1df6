# The sensors device: SensorsController on iotlib (what `picoiot deploy` puts on a board of kind "sensors").
metadata(description="SensorsController: sensors streamed over a token-authenticated WebSocket", version="0.1.0")
require("iotlib")
module("sensors_controller.py", base_path="$(FIRMWARE)")
