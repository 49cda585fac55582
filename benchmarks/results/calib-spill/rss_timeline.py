"""rss_timeline.py OUT.log -- CMD...: run CMD, log 't anon_MiB file_MiB' every 0.5 s and its stderr lines with t."""
import subprocess, sys, threading, time
from pathlib import Path
out = Path(sys.argv[1]); cmd = sys.argv[3:]
t0 = time.time(); p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
log = open(out, "w"); lock = threading.Lock(); peak = [0, 0]
def err():
    for line in p.stderr:
        with lock: log.write(f"{time.time()-t0:7.1f} ERR {line.rstrip()}\n"); log.flush()
threading.Thread(target=err, daemon=True).start()
while p.poll() is None:
    try:
        st = dict(l.split(":", 1) for l in Path(f"/proc/{p.pid}/status").read_text().splitlines())
        a, f = int(st["RssAnon"].split()[0]) >> 10, int(st["RssFile"].split()[0]) >> 10
        peak[0] = max(peak[0], a); peak[1] = max(peak[1], a + f)
        with lock: log.write(f"{time.time()-t0:7.1f} {a} {f}\n")
    except Exception: pass
    time.sleep(0.5)
so = p.stdout.read()
with lock: log.write(f"END rc={p.returncode} wall={time.time()-t0:.1f} peak_anon={peak[0]} peak_rss={peak[1]}\n{so[-3000:]}\n")
print(f"rc={p.returncode} wall={time.time()-t0:.1f} peak_anon_MiB={peak[0]} peak_rss_MiB={peak[1]}")
