"""Where is a process's main thread? A sampling profiler for native code, for machines without gdb or perf.

Every INTERVAL seconds it stops the main thread of each matching `deno` process with ptrace (seize and
interrupt), reads its instruction pointer and scans 16 KiB of its stack for return addresses. It writes one
line per sample: seconds since start, pid, then `library+offset` for the instruction pointer and each return
address found. Offsets are file offsets; resolve them with `nm -D`/`objdump` on the same binary. Stack scanning
is crude (stale values show up), so count the leading frames.

It found the Dawn polling stall (BENCHMARKS.md, "Where the wall time went"): 60-77% of the samples were at
one loop in Deno's `ext/napi`.

Run beside the workload, as root or with CAP_SYS_PTRACE, on Linux x86-64:
    python3 bench/tools/pc_sample.py "deno run" samples.txt 0.05 &
"""
import ctypes, ctypes.util, os, sys, time, struct, subprocess, bisect
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
SEIZE, INTERRUPT, GETREGS, DETACH = 0x4206, 0x4207, 12, 17
class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs").split()]
def maps(pid):
    m = []
    for l in open(f"/proc/{pid}/maps"):
        p = l.split()
        a, b = (int(x, 16) for x in p[0].split("-"))
        if "x" not in p[1]: continue
        name = p[5] if len(p) > 5 else "[anon]"
        m.append((a, b, os.path.basename(name), int(p[2], 16)))
    m.sort()
    return m
def where(m, starts, addr):
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and m[i][0] <= addr < m[i][1]:
        a, b, n, off = m[i]
        return f"{n}+{addr - a + off:x}"
    return None
def sample(pid, tid, m, starts):
    if libc.ptrace(SEIZE, tid, None, None) != 0: return "seize-failed:" + str(ctypes.get_errno())
    try:
        libc.ptrace(INTERRUPT, tid, None, None)
        st = ctypes.c_int()
        libc.waitpid(tid, ctypes.byref(st), 0x40000000)
        r = Regs()
        libc.ptrace(GETREGS, tid, None, ctypes.byref(r))
        frames = [where(m, starts, r.rip) or f"?{r.rip:x}"]
        try:
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(r.rsp); buf = f.read(16384)
            for (v,) in struct.iter_unpack("<Q", buf[: len(buf) // 8 * 8]):
                w = where(m, starts, v)
                if w and not w.startswith("[anon]") and (not frames or frames[-1] != w): frames.append(w)
                if len(frames) >= 14: break
        except Exception as e:
            frames.append("memerr")
        return " ".join(frames)
    finally:
        libc.ptrace(DETACH, tid, None, None)
pat, outp = sys.argv[1], sys.argv[2]  # pgrep pattern, output file
iv = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
out = open(outp, "w"); t0 = time.time(); cache = {}
while True:
    pids = subprocess.run(["pgrep", "-f", pat], capture_output=True, text=True).stdout.split()
    pids = [p for p in pids if open(f"/proc/{p}/comm").read().strip() == "deno"] if pids else []
    for pid in pids:
        pid = int(pid)
        try:
            if pid not in cache or time.time() - cache[pid][2] > 5:
                m = maps(pid); cache[pid] = (m, [x[0] for x in m], time.time())
            m, starts, _ = cache[pid]
            out.write(f"{time.time()-t0:.2f} {pid} {sample(pid, pid, m, starts)}\n")
        except Exception as e:
            out.write(f"{time.time()-t0:.2f} {pid} err {e}\n")
    out.flush()
    time.sleep(iv)
