# microdot's core: the hello-world baseline of the memory benches (bench/heaplib.py), never on a board. The device's
# web layer is its own (iotlib.web): microdot's code cost 11.4K of heap and 111 interned names on a 32-bit build
# (docs/benchmarks.md).
metadata(description="microdot core (pinned: pyproject.toml's firmware extra)", version="2.7.0")
package("microdot", files=("__init__.py", "microdot.py"), base_path="$(MICRODOT)")
