# The board bundle on a simulated Pico W: the simulator (picosim) and the launchers that run a controller on it.
# Test equipment: never in a board bundle; the unix port and the tests run this one.
metadata(description="the board bundle plus the simulated board", version="0.1.0")
require("board")
package("picosim", base_path="$(FIRMWARE)")
module("main_sim.py", base_path="$(FIRMWARE)")
module("boot_romfs.py", base_path="$(FIRMWARE)")
