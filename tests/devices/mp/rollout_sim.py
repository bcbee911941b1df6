# main_sim whose new code can crash at boot, for the rollout test (tests only). The simulated flash is the OTA code
# root but the simulated firmware is not imported from it (docs/ota.md), so a release stands for broken code by
# carrying the file crash_at_boot.py: a trial boot that finds it there resets, as a controller failing at import
# does on a board (the uncaught exception, then the watchdog). The next boot is the second trial boot: the device's
# boot guard rolls the release back and reports it. Runs under the unix micropython (.mpy) and CPython.
import sys
import main_sim
from iotlib import fsutil
import picosim as sim
from iotlib.device import Device

_boot = Device.boot


def _boot_or_crash(self):
    _boot(self)
    if self.ota_boot.get("trial") and fsutil.exists(self.flash("crash_at_boot.py")):
        sim.board.reset("crash at boot")


Device.boot = _boot_or_crash
main_sim.main(sys.argv[1:])
