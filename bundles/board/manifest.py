# The board bundle `picoiot firmware build` writes: both devices and the board's entry point, as .mpy.
metadata(description="picoiot firmware for a Pico W: the relays and the sensors device", version="0.1.0")
require("relays")
require("sensors")
module("main.py", base_path="$(FIRMWARE)")
