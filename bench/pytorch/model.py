"""PyTorch baseline for bench/model.ts: a random-init Llama-3.2-1B-shape LlamaForCausalLM (Hugging Face
transformers, sdpa attention) on the same GPU.

prefill: batch 1, 2048 tokens, full logits, no_grad, median of 5 after 2 warm-ups (CUDA-synchronised wall time).
decode: generate(use_cache=True, do_sample=False) of 256 new tokens after a 128-token prompt; tokens/s = 256 / wall
time of the whole call (prefill included), median of 3 after one short warm-up (as perf_baselines.md).
train (--train): HF causal-LM cross-entropy, backward, AdamW(betas 0.9/0.98), batch 4 x 2048, all parameters.
Precisions: fp32 with TF32 off (the issue's reference for f32 kernels) and bf16.

Run: python bench/pytorch/model.py [--quick] [--train]
"""

import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def config(quick: bool) -> LlamaConfig:
    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=1000, rope_theta=500000.0,
                           tie_word_embeddings=True)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5)


def wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    quick = "--quick" in sys.argv
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    T = 64 if quick else 2048
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config(quick)).to(dev, dtype=dtype).eval()
        model.config._attn_implementation = "sdpa"
        ids = torch.randint(0, model.config.vocab_size, (1, T), device=dev)
        with torch.no_grad():
            for _ in range(2):
                wall(lambda: model(ids, use_cache=False))
            times = [wall(lambda: model(ids, use_cache=False)) for _ in range(5)]
        med = statistics.median(times)
        print(json.dumps({"bench": "model_pytorch", "model": "teacher", "what": "prefill", "precision": prec,
                          "tokens": T, "median_ms": round(med, 2), "tokens_per_s": round(T / (med / 1000))}),
              flush=True)
        prompt = torch.randint(0, model.config.vocab_size, (1, 8 if quick else 128), device=dev)
        n = 16 if quick else 256
        gen = lambda k: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                       use_cache=True, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            wall(lambda: gen(8))
            dt = [wall(lambda: gen(n)) for _ in range(3)]
        med = statistics.median(dt)
        print(json.dumps({"bench": "model_pytorch", "model": "teacher", "what": "decode", "precision": prec,
                          "new_tokens": n, "wall_ms": round(med, 1), "tokens_per_s": round(n / (med / 1000), 1)}),
              flush=True)
        if "--train" in sys.argv:
            model.train()
            B = 2 if quick else 4
            x = torch.randint(0, model.config.vocab_size, (B, T), device=dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), foreach=True)

            def step():
                loss = model(x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            wall(step)
            st = [wall(step) for _ in range(3)]
            med = statistics.median(st)
            print(json.dumps({"bench": "model_pytorch", "model": "teacher", "what": "train_step", "precision": prec,
                              "batch": B, "seq": T, "median_ms": round(med, 1),
                              "tokens_per_s": round(B * T / (med / 1000)),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}), flush=True)
            del opt
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
