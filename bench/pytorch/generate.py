"""PyTorch baseline for bench/generate_throughput.ts: Hugging Face `generate` (KV cache, fp32, sdpa) on the
fixture teacher (stories260K) with the same workload: batch B of 16-token prompts, exactly 256 new tokens
(min_new_tokens = max_new_tokens, so EOS does not end rows early), greedy / temperature 1 / the paper's sampling
(0.7, top-k 10, top-p 0.95). Wall time of the whole call after one warm-up, CUDA-synchronised.

Run: python bench/pytorch/generate.py [--batches 16,256,1024] [--new 256]
"""

import json
import os
import sys
import time

import torch
from transformers import LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "fixtures", "models", "stories260K-hf")
SAMPLINGS = {
    "greedy": dict(do_sample=False),
    "t1": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
    "paper": dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.95),
}


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    batches = [int(b) for b in arg("--batches", "16,256,1024").split(",")]
    new = int(arg("--new", "256"))
    model = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).cuda().eval()
    V = model.config.vocab_size
    out = os.environ.get("OUT")
    rows = []
    for B in batches:
        ids = [[1] + [3 + ((i * 7919 + t * 104729) % (V - 3)) for t in range(15)] for i in range(B)]
        x = torch.tensor(ids, device="cuda")
        for name, kw in SAMPLINGS.items():
            gen = lambda n: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                           min_new_tokens=n, pad_token_id=0, **kw)
            with torch.no_grad():
                gen(8)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                gen(new)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000
            row = dict(bench="generate_pytorch", batch=B, sampling=name, new_tokens=new, wall_ms=round(ms, 1),
                       ms_per_step=round(ms / new, 3), tokens_per_s=round(B * new / (ms / 1000)),
                       torch=torch.__version__, gpu=torch.cuda.get_device_name())
            print(json.dumps(row), flush=True)
            rows.append(row)
    if out:
        with open(os.path.join(out, "generate_pytorch.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
