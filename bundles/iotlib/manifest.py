# iotlib, the device library: every module of the package (a controller imports only the managers it uses).
metadata(description="iotlib: network, registration, config, state, heartbeat, alarms, OTA and the device's web API",
         version="0.1.0")
package("iotlib", base_path="$(FIRMWARE)")
