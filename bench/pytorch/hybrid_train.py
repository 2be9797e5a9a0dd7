"""PyTorch B, back to back with bench/model.ts --train: the official 50% Mamba2 hybrid of the Llama-3.2-1B shape.

The model is what ../shared/fixtures/reference/perf_baselines.md calls B: a random-init LlamaForCausalLM (sdpa)
turned into the hybrid by MambaInLlama's `MambaTransformerHybridModelWrapper` (init_with_kqvo, attention kept in
layers 1, 3, ..., 15, Mamba2 with expand 1, ngroups 32, d_state 64 elsewhere), whose Mamba2 layers run mamba_ssm's
Triton SSD, gated RMSNorm and layer norms. The conv is `F.conv1d` (the CUDA causal_conv1d extension is not
installed; `causal_conv1d_torch` below), as in perf_baselines.md. Everything is cast to bf16, as MambaInLlama's
train_hybrid.py does.

Steps, batch 4 x 2048:
- ce: `model(ids, labels=ids).loss`, backward, AdamW(lr 1e-5, betas (0.9, 0.98), foreach) over the Mamba
  parameters, zero_grad (perf_baselines.md (b) B);
- distill (--distill): the same plus a no-grad forward of the teacher (the Llama it came from) and
  0.1 * KL(teacher || student) over the vocabulary, the counterpart of bench/model.ts's distill step.
Median of `--reps` steps (CUDA-synchronised wall time) after 2 warm-up steps (Triton autotuning happens there).

The third-party sources come from .baseline/ (bench/pytorch/baseline_sources.sh); mamba_ssm is imported as a bare
package so that its __init__, which loads the CUDA selective-scan extension, does not run.

Run: python3 bench/pytorch/hybrid_train.py [--src .baseline] [--reps 8] [--distill] [--quick]
"""

import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def import_official(src: str):
    """The official hybrid wrapper and config, from the sources in `src`."""
    src = os.path.abspath(src)
    if not os.path.isdir(os.path.join(src, "mamba_ssm")):
        sys.exit(f"hybrid_train.py: no mamba_ssm/ in {src}: run bench/pytorch/baseline_sources.sh first")
    sys.path.insert(0, src)
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(src, "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg
    from mamba2 import hybrid_mamba_layer
    from mamba2.hybrid_mamba_config import MambaConfig
    from mamba2.hybrid_model import MambaDecoderLayer
    from mamba2.hybrid_wrapper import MambaTransformerHybridModelWrapper

    # Without the causal_conv1d package the layer's own fallback keeps only the last d_conv - 1 positions, so
    # the conv goes through causal_conv1d_torch, as perf_baselines.md's run did with the package's reference.
    if hybrid_mamba_layer.causal_conv1d_fn is None:
        hybrid_mamba_layer.causal_conv1d_fn = causal_conv1d_torch
    return MambaConfig, MambaDecoderLayer, MambaTransformerHybridModelWrapper


def causal_conv1d_torch(x, weight, bias=None, activation=None, seq_idx=None):
    """Depthwise causal conv over the last axis of x [B, D, L] with weight [D, W] in plain PyTorch (`F.conv1d`):
    what the causal_conv1d package's pure-PyTorch reference computes, for the package's `causal_conv1d_fn`."""
    assert seq_idx is None, "causal_conv1d_torch: no packed sequences"
    dim, width = weight.shape
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return (F.silu(out) if activation in ("silu", "swish") else out).to(x.dtype)


def tensor_layers() -> bool:
    """Whether this transformers' LlamaModel takes a bare tensor from each decoder layer (5.x) or a tuple (4.x)."""
    import inspect

    from transformers.models.llama import modeling_llama

    return "layer_outputs[0]" not in inspect.getsource(modeling_llama.LlamaModel.forward)


def build(quick: bool, dtype):
    sys.path.insert(0, HERE)
    from model import config  # bench/pytorch/model.py: the Llama-3.2-1B shape (or the quick one)
    from transformers import LlamaForCausalLM

    MambaConfig, MambaDecoderLayer, Wrapper = import_official(arg("--src", os.path.join(HERE, "..", "..", ".baseline")))
    cfg = config(quick)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).to("cuda", dtype=dtype)
    student_base = LlamaForCausalLM(cfg).to("cuda", dtype=dtype)
    student_base.load_state_dict(teacher.state_dict())
    hd = cfg.head_dim
    mamba_cfg = MambaConfig(
        cfg.hidden_size,
        {"expand": 1, "ngroups": cfg.num_attention_heads, "d_state": hd},
        cfg.rms_norm_eps,
        d_inner=cfg.num_attention_heads * hd,
        d_xb=cfg.num_key_value_heads * hd,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        n_layer=cfg.num_hidden_layers,
        attn_layers=list(range(1, cfg.num_hidden_layers, 2)),
    )
    student = Wrapper(None, student_base, mamba_cfg, mamba_cfg.attn_layers, dtype, True)
    if tensor_layers():
        # MambaDecoderLayer returns (hidden, None, cache) for transformers 4.x; 5.x expects the tensor alone
        forward = MambaDecoderLayer.forward
        MambaDecoderLayer.forward = lambda self, *a, **k: forward(self, *a, **k)[0]
    for name, p in student.named_parameters():
        p.requires_grad_("mamba" in name)
    teacher.eval().requires_grad_(False)
    return student, teacher


def main() -> None:
    quick = "--quick" in sys.argv
    reps = int(arg("--reps", "8"))
    B, T = (2, 256) if quick else (4, 2048)
    dtype = torch.bfloat16
    student, teacher = build(quick, dtype)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.98), foreach=True)
    V = student.config.vocab_size
    ids = torch.randint(0, V, (B, T), device="cuda")
    n_trainable = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in student.parameters())

    def ce_step():
        loss = student(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def distill_step():
        with torch.no_grad():
            t_logits = teacher(ids, use_cache=False).logits.float()
        out = student(ids, labels=ids, use_cache=False)
        s_logp = F.log_softmax(out.logits.float(), dim=-1)
        t_logp = F.log_softmax(t_logits, dim=-1)
        kl = F.kl_div(s_logp.view(-1, V), t_logp.view(-1, V), log_target=True, reduction="batchmean")
        loss = out.loss + 0.1 * kl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    steps = [("train_step", ce_step, "ce")]
    if "--distill" in sys.argv:
        steps.append(("distill_step", distill_step, "ce + 0.1 kl, teacher forward included"))
    for what, step, loss_name in steps:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        med = statistics.median(times)
        print(json.dumps({
            "bench": "model_pytorch", "model": "hybrid_official", "what": what, "loss": loss_name,
            "precision": "bf16", "batch": B, "seq": T, "median_ms": round(med, 1),
            "tokens_per_s": round(B * T / (med / 1000)), "runs_ms": [round(t, 1) for t in times],
            "last_loss": round(float(loss.detach()), 4), "trainable_params": n_trainable, "params": n_all,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
