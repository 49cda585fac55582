"""One 3 534-token prompt through a packed checkpoint (argv[1]) at an unlimited budget: the run's RSS growth and the
heap bytes still in use after it (glibc mallinfo2), beside the plan's workspace. BENCHMARKS.md 0.18."""
from d2moe.runtime.session import Session, RunOptions
from d2moe.runtime.generate import SamplingOptions
import ctypes, sys
class MI(ctypes.Structure):
    _fields_=[(n,ctypes.c_size_t) for n in ('arena','ordblks','smblks','hblks','hblkhd','usmblks','fsmblks','uordblks','fordblks','keepcost')]
libc=ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype=MI
text=open('d2moe_cli/assets/text/grimm_tales.heldout.txt').read()[:12000]
opts=RunOptions(memory_budget=1<<30, max_tokens=5000, forward_tokens=512)
with Session(sys.argv[1], opts) as s:
    b=libc.mallinfo2().uordblks
    r=s.generate([text], sampling=SamplingOptions(max_new_tokens=2))
    m=r.stats['memory']; print(s.ckpt.dtype, 'prompt', r.stats['prompt_tokens'], 'rss delta MiB', m['rss_peak_delta_bytes']>>20, 'retained MiB', (libc.mallinfo2().uordblks-b)>>20, 'workspace', m['plan']['workspace']>>20)
