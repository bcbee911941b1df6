# microdot's hello world (the baseline every memory/speed figure is compared with). Runs under micropython.
import sys
from microdot import Microdot

app = Microdot()


@app.route("/")
async def index(request):
    return "Hello, world!"


app.run(host="127.0.0.1", port=int(sys.argv[-1]))
