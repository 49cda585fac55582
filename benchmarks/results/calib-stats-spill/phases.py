"""phases.py LOG: peak RssAnon per phase (layer pass / layer fits) from an rss_timeline log."""
import re, sys
phase, peaks, order = "start", {}, []
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) >= 3 and p[1] == "ERR":
        m = re.search(r"calibrating layer (\d+)", line)
        if m: phase = f"L{m.group(1)} pass"
        m = re.search(r"decoder layer (\d+)/\d+ run", line)
        if m: phase = f"L{m.group(1)} fits"
        continue
    if len(p) == 3 and p[1].isdigit():
        if phase not in peaks: order.append(phase); peaks[phase] = 0
        peaks[phase] = max(peaks[phase], int(p[1]))
    if line.startswith("END"): print(line.strip()[:120])
print(" | ".join(f"{k}: {peaks[k]}" for k in order))
