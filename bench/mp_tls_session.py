# What one TLS client session costs the MicroPython GC heap: gc.mem_free() before the socket, with the session open
# after one request, and after close. Run by bench/tls_session.py: micropython mp_tls_session.py PORT CA.der
import gc
import socket
import ssl
import sys


def free():
    gc.collect()
    return gc.mem_free()


port = int(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    der = f.read()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=der)
base = free()
s = socket.socket()
s.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
ss = ctx.wrap_socket(s, server_hostname="127.0.0.1")
ss.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
data = ss.read(64)
during = free()
ss.close()
after = free()
print("status_ok" if b" 200 " in data else "status_bad", "session_bytes=%d" % (base - during),
      "after_close_bytes=%d" % (base - after))
