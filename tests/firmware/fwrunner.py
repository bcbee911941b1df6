# MicroPython-side runner for the dual-runtime firmware suite: `micropython -m fwrunner test_module`.
# Runs every test_* function of one module and prints one line per test, then `RESULT <passed> <failed>`.
import sys
import gc


def main(modname):
    passed = failed = 0
    try:
        mod = __import__(modname)
    except Exception as e:
        print("FAIL", modname, "(import)")
        sys.print_exception(e)
        print("RESULT 0 1")
        return
    names = sorted(n for n in dir(mod) if n.startswith("test_"))
    for name in names:
        fn = getattr(mod, name)
        if not callable(fn):
            continue
        gc.collect()
        try:
            fn()
            passed += 1
            print("PASS", modname + "::" + name)
        except Exception as e:
            failed += 1
            print("FAIL", modname + "::" + name)
            sys.print_exception(e)
    print("RESULT", passed, failed)


main(sys.argv[-1])
