"""HBM copy bandwidth of the current CUDA GPU with torch (for the decode floor): the median of 10
copies of 4 GiB, counting the bytes read and written. Prints one JSON line."""
import json

import torch

n = 1 << 30  # 1 Gi float32 = 4 GiB
a = torch.empty(n, device="cuda")
a.uniform_()
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record()
    b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
t = ts[len(ts) // 2]
print(json.dumps({"check": "hbm_copy", "bytes_moved": 2 * 4 * n, "median_s": t, "GBps": 2 * 4 * n / t / 1e9}))
