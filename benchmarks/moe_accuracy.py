"""Quantizing a trained mixture-of-experts LM: perplexity and KL of RTN / GPTQ / HQQ on experts.

No trained MoE checkpoint is available offline, so this script makes one, deterministically
(seed 0), and caches it under benchmarks/.cache/: the 3M fixture Llama (4 layers, hidden 128)
upcycled into a Mixtral (each layer's MLP copied into 8 experts, a new top-2 router; router
load-balancing loss 0.01), then fine-tuned, all of it, on the validation split of
shakespeare-mix (264,759 tokens; the fixture never saw it, see
../shared/data/shakespeare-mix-README.md), 300 AdamW steps of 16 x 256 tokens. Then, for each
configuration: quantize (experts, attention; the embedding and lm_head stay float), and score on
the TEST split: perplexity and KL(float || quantized), first 32,768 tokens, context 512, stride
512. Calibration: 64 x 512 tokens of the validation split (the training text; the test split is
never used for it).

Configurations: RTN, GPTQ and HQQ at w4g128 and w3g128, and GPTQ with the experts calibrated on
the tokens routed to them only (``moe_calibration="routed"``; the default, "all", runs every
expert on every calibration token).

Writes benchmarks/results/moe_accuracy.md. Run: python benchmarks/moe_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from datetime import date
from pathlib import Path

import torch
from _machine import machine_line

import lowbit
from lowbit.eval.perplexity import compare_logits, perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL = SHARED / "data" / "shakespeare-mix-val.txt"
TEST = SHARED / "data" / "shakespeare-mix-test.txt"
CACHE = Path(__file__).parent / ".cache"  # one model per --steps
RESULTS = Path(__file__).parent / "results" / "moe_accuracy.md"
EXCLUDE = ["lm_head", "*embed*"]
EXPERTS = 8


def tokens(tokenizer, path: Path) -> torch.Tensor:
    return tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt",
                     add_special_tokens=False).input_ids[0]


def upcycle(val_ids: torch.Tensor, steps: int) -> torch.nn.Module:
    """The 3M fixture Llama upcycled into a Mixtral and fine-tuned on ``val_ids`` (cached in
    CACHE once trained): every expert starts as a copy of the layer's dense MLP and a new router
    (random, small) picks two of them (sparse upcycling), so the model starts exactly as the
    dense one and its experts diverge as each is trained on the tokens routed to it."""
    from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    cache = CACHE / f"tiny-moe-shakespeare-{steps}-steps"
    if (cache / "config.json").is_file():
        return MixtralForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    dense = LlamaForCausalLM.from_pretrained(TOKENIZER, dtype=torch.float32).eval()
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, num_local_experts=EXPERTS,
        num_experts_per_tok=2, router_aux_loss_coef=0.01, output_router_logits=True,
        tie_word_embeddings=False, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            mlp = dense.model.layers[i].mlp
            layer.mlp.experts.gate_up_proj.copy_(torch.cat(
                [mlp.gate_proj.weight, mlp.up_proj.weight])[None].expand(EXPERTS, -1, -1))
            layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight[None].expand(EXPERTS, -1, -1))
            layer.mlp.gate.weight.normal_(0, 0.02)
    left = [k for k in missing if not k.endswith(("experts.gate_up_proj", "experts.down_proj",
                                                  "mlp.gate.weight"))]
    if left:
        raise SystemExit(f"upcycling left {left[:3]} uninitialized")
    probe = val_ids[:256][None]
    with torch.no_grad():
        gap = (model(probe).logits - dense(probe).logits).abs().max()
    print(f"upcycled: max |logit difference| vs the dense model {float(gap):.2e}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    warmup = 30
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(0)
    batch, length = 16, 256
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, val_ids.numel() - length - 1, (batch,), generator=generator)
        x = torch.stack([val_ids[o:o + length] for o in offsets.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {float(loss.detach()):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.config.output_router_logits = False
    model.save_pretrained(cache)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="8,192 test tokens, 16 x 512 "
                        "calibration tokens")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    val_ids, test_ids = tokens(tokenizer, VAL), tokens(tokenizer, TEST)
    reference = upcycle(val_ids, args.steps)
    reference.set_experts_implementation("eager")
    max_tokens, calib_samples = (8192, 16) if args.quick else (32768, 64)
    calib = val_ids[: calib_samples * 512].reshape(calib_samples, 512)
    configs = [("float", None, None, False)]
    for spec in ("w4g128", "w3g128"):
        configs += [(spec, "rtn", None, False), (spec, "hqq", None, False),
                    (spec, "gptq", calib, False), (spec, "gptq", calib, True)]
    rows = []
    for spec, algorithm, calib_ids, routed_only in configs:
        model = copy.deepcopy(reference)
        seconds = 0.0
        if spec != "float":
            start = time.perf_counter()
            lowbit.quantize(model, spec, algorithm=algorithm, calib=calib_ids, exclude=EXCLUDE,
                            moe_calibration="routed" if routed_only else "all")
            seconds = time.perf_counter() - start
        with torch.inference_mode():
            result = compare_logits(model, reference, test_ids, context=512, stride=512,
                                    max_tokens=max_tokens)
        label = "float" if spec == "float" else f"{spec} {algorithm}" + (
            " moe_calibration=routed" if routed_only else "")
        rows.append((label, result.ppl, result.kl_mean, result.top1_agreement, seconds))
        print(f"{label}: ppl {result.ppl:.3f} KL {result.kl_mean:.5f}", flush=True)
    n_params = sum(p.numel() for p in reference.parameters())
    from transformers import LlamaForCausalLM

    dense = LlamaForCausalLM.from_pretrained(TOKENIZER, dtype=torch.float32).eval()
    with torch.inference_mode():
        dense_ppl = perplexity(dense, test_ids, context=512, stride=512,
                               max_tokens=max_tokens).ppl
    lines = [
        f"# Quantizing a trained MoE LM ({date.today()})", "",
        f"Machine: {machine_line()}.", "",
        "Model: the 3M fixture Llama upcycled by this script into a Mixtral ("
        f"{n_params / 1e6:.1f}M parameters: 4 layers, hidden 128, {EXPERTS} experts of width "
        "384 made from each layer's MLP, a new top-2 router), then fine-tuned: "
        f"{args.steps} AdamW steps of 16 x 256 tokens of the shakespeare-mix validation split, "
        "seed 0 (the dense fixture, float, "
        f"scores perplexity {dense_ppl:.3f} under the same protocol). Protocol: "
        f"the test split, first {max_tokens:,} tokens, context 512, stride 512; KL(float || "
        "quantized) per token, mean; top-1: agreement of the argmax with the float model. "
        f"Calibration (GPTQ): {calib_samples} x 512 tokens of the validation split. The "
        "embedding and lm_head stay float; attention and every expert are quantized.", "",
        "| configuration | perplexity | KL mean | top-1 agreement | quantize s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, ppl, kl, top1, seconds in rows:
        lines.append(f"| {label} | {ppl:.3f} | {kl:.5f} | {100 * top1:.2f} % | "
                     f"{seconds:.1f} |")
    lines += ["", "Run: `python benchmarks/moe_accuracy.py`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
