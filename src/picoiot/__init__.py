"""picoiot: control plane and host tooling for the Raspberry Pi Pico W IoT platform."""
__version__ = "0.1.0"
