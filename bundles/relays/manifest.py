# The relays device: RelaysController on iotlib (what `picoiot deploy` puts on a board of kind "relays").
metadata(description="RelaysController: REST relay control with roles and rate limits", version="0.1.0")
require("iotlib")
module("relays_controller.py", base_path="$(FIRMWARE)")
