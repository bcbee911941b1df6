# Device lifecycle wiring of OTA / safe mode (own module: the device stack and the Ed25519 tests do not share a heap)
import fwtest
from iotlib.ota import OTAUpdateManager


def test_device_boot_enters_safe_mode_without_its_domain():
    from iotlib.device import Device

    class _D(Device):
        domains = 0

        def setup_domain(self, config):
            _D.domains += 1

    flash = fwtest.tmpdir("safe")
    for i in range(OTAUpdateManager.safe_mode_after):
        d = _D("ssid", "pw", "dev-1", "k" * 64, "http://127.0.0.1:1/api/devices", flash_dir=flash)
        d.boot()
        assert not d.safe_mode
    assert _D.domains == OTAUpdateManager.safe_mode_after
    d = _D("ssid", "pw", "dev-1", "k" * 64, "http://127.0.0.1:1/api/devices", flash_dir=flash)
    d.boot()
    assert d.safe_mode and _D.domains == OTAUpdateManager.safe_mode_after
    d._became_healthy()
    d = _D("ssid", "pw", "dev-1", "k" * 64, "http://127.0.0.1:1/api/devices", flash_dir=flash)
    d.boot()
    assert not d.safe_mode and _D.domains == OTAUpdateManager.safe_mode_after + 1


def test_unload_of_a_module_that_is_not_loaded_is_a_no_op():
    # The OTA task drops iotlib.ota/ed25519/otaboot after every check, loaded or not. On MicroPython delattr of a
    # missing module attribute raises KeyError (CPython: AttributeError): the task crashed on every pass, raising an
    # "ota" alarm each time, whenever no update had been offered.
    import sys
    from iotlib.device import _unload
    _unload("iotlib.ed25519")
    assert "iotlib.ed25519" not in sys.modules
    _unload("iotlib.ed25519", "iotlib.no_such_module")  # not loaded: nothing to do, no exception
    assert "iotlib.ed25519" not in sys.modules and "iotlib.no_such_module" not in sys.modules
