"""`lowbit eval`: perplexity / KL divergence (causal LMs) or embedding fidelity (encoders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowbit.cli.common import console, err_console, fail
from lowbit.eval.embeddings import SENTENCES, embed, embedding_fidelity
from lowbit.eval.perplexity import compare_logits, perplexity
from lowbit.eval.size import human_bytes
from lowbit.eval.speed import latency, weight_bytes


def is_lowbit_folder(path: Path) -> bool:
    """True when ``path/config.json``'s ``quantization_config.quant_method`` is one lowbit.load
    reads into its quantized modules: "lowbit" or "compressed-tensors"."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") in ("lowbit", "compressed-tensors")


def _folder_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def load_model(path: Path) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer or None, kind)`` from a plain HF folder, a ``lowbit.save`` folder or a
    compressed-tensors checkpoint (run by lowbit's kernels)."""
    from transformers.utils import logging as hf_logging

    from lowbit.io import load
    from lowbit.models.hf import load_hf_model, model_kind

    hf_logging.disable_progress_bar()  # keep the CLI output to our table (and errors one line)

    if not path.exists():
        raise ValueError(f"MODEL_DIR {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"MODEL_DIR {str(path)!r} is not a model folder (no config.json); a Hugging Face or "
            "lowbit model folder is expected"
        )
    if is_lowbit_folder(path):
        model = load(path)
        return model, _folder_tokenizer(path), model_kind(model.config)
    return load_hf_model(path)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"--text {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def _lm_rows(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    text_file: Path,
    context: int,
    stride: int,
    max_tokens: int | None,
) -> tuple[list[str], list[tuple[str, str, str]], torch.Tensor]:
    ids = tokenizer(_read_text(text_file), return_tensors="pt", add_special_tokens=False,
                    verbose=False).input_ids[0]
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    if n < context:
        raise ValueError(
            f"--text {str(text_file)!r} has {n} tokens"
            + (f" (after --max-tokens {max_tokens})" if max_tokens is not None else "")
            + f"; one window of --context {context} needs at least {context}"
        )
    rows: list[tuple[str, str, str]] = []
    bar = Progress(TextColumn("scoring windows"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, transient=True)
    task = bar.add_task("", total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        if reference is None:
            r = perplexity(model, ids, context, stride, max_tokens, progress=progress)
        else:
            c = compare_logits(model, reference, ids, context, stride, max_tokens,
                               progress=progress)
    if reference is None:
        rows.append(("perplexity", f"{r.ppl:.4f}", ""))
        rows.append(("mean NLL (nats/token)", f"{r.nll:.5f}", ""))
        tokens, windows = r.tokens, r.windows
    else:
        rows.append(("perplexity", f"{c.ppl:.4f}", f"{c.reference_ppl:.4f}"))
        rows.append(("KL(reference || model) mean", f"{c.kl_mean:.6f}", ""))
        rows.append(("KL p99 / max", f"{c.kl_p99:.6f} / {c.kl_max:.6f}", ""))
        rows.append(("top-1 agreement", f"{100 * c.top1_agreement:.2f} %", ""))
        tokens, windows = c.tokens, c.windows
    protocol = [
        f"text: {text_file} ({ids.numel():,} tokens, no special tokens added"
        + (f"; the first {n:,} used" if n < ids.numel() else "") + ")",
        f"context {context}, stride {stride}: {windows:,} windows, {tokens:,} tokens scored "
        "(each once; past the first window with at least context - stride tokens of context)",
    ]
    return protocol, rows, ids[:context][None]


def _encoder_rows(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    text_file: Path | None,
) -> tuple[list[str], list[tuple[str, str, str]], dict[str, torch.Tensor]]:
    if text_file is not None:
        sentences = [s.strip() for s in _read_text(text_file).splitlines() if s.strip()]
        source = f"{len(sentences)} non-empty lines of {text_file}"
    else:
        sentences = list(SENTENCES)
        source = f"{len(sentences)} built-in English sentences"
    if len(sentences) < 2:
        raise ValueError(f"--text {str(text_file)!r} needs at least 2 non-empty lines")
    rows: list[tuple[str, str, str]] = []
    if reference is not None:
        f = embedding_fidelity(model, reference, tokenizer, sentences)
        rows.append(("cosine to reference mean / min", f"{f.mean_cosine:.5f} / "
                     f"{f.min_cosine:.5f}", ""))
        rows.append(("nearest-neighbour agreement", f"{100 * f.nn_agreement:.1f} %", ""))
    else:
        embed(model, tokenizer, sentences)  # checks the model runs; fidelity needs --reference
    protocol = [
        f"sentences: {source}; mean pooling over the attention mask + L2 normalisation "
        "(as sentence-transformers' all-MiniLM-L6-v2)"
    ]
    batch = dict(tokenizer(sentences[:32], padding=True, truncation=True, max_length=256,
                           return_tensors="pt"))
    return protocol, rows, batch


@torch.no_grad()  # scoped: tests run commands in-process, a global switch would leak
def eval_command(
    model_dir: Path = typer.Argument(..., help="A Hugging Face or lowbit-quantized model folder."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Model folder to compare against (e.g. the float original)."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="UTF-8 text file: the token stream (causal LMs) or one sentence per "
        "line (encoders; default: built-in sentences)."
    ),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    stride: int | None = typer.Option(
        None, "--stride", help="Window step; later windows score this many (default: --context "
        "/ 2)."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Use only the first N tokens of --text."
    ),
    repeats: int = typer.Option(5, "--repeats", help="Timed forward passes for the latency."),
) -> None:
    """Accuracy against a reference (perplexity, KL divergence, top-1 / embedding cosine), latency
    and weight memory of a model."""
    try:
        if text is not None and not text.is_file():
            raise ValueError(f"--text {str(text)!r} does not exist or is not a file")
        if repeats < 1:
            raise ValueError(f"--repeats {repeats}; must be >= 1")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"--max-tokens {max_tokens}; must be >= 1")
        if reference is not None and not reference.is_dir():
            raise ValueError(f"--reference {str(reference)!r} does not exist or is not a folder")
        if context < 2:
            raise ValueError(f"--context {context}; must be >= 2 tokens")
        if stride is None:
            stride = max(1, context // 2)
        if not 1 <= stride <= context:
            raise ValueError(f"--stride {stride}; must be in 1..--context ({context})")
        model, tokenizer, kind = load_model(model_dir)
        ref_model = ref_tok = None
        if reference is not None:
            ref_model, ref_tok, ref_kind = load_model(reference)
            if ref_kind != kind:
                raise ValueError(f"MODEL_DIR is a {kind} but --reference is a {ref_kind}")
        tokenizer = tokenizer or ref_tok
        if tokenizer is None:
            raise ValueError(f"no tokenizer in {str(model_dir)!r} (or in --reference)")
        if kind == "causal-lm":
            if text is None:
                raise ValueError("--text FILE is required for causal LMs (the text to score)")
            protocol, rows, window = _lm_rows(
                model, ref_model, tokenizer, text, context, stride, max_tokens
            )
            inputs: dict[str, torch.Tensor] = {"input_ids": window}
            timed = f"one forward pass on [1, {context}] tokens"
        else:
            ignored = [f"--{name.replace('_', '-')}" for name, value, default in (
                ("context", context, 512), ("stride", stride, max(1, context // 2)),
                ("max_tokens", max_tokens, None)) if value != default]
            if ignored:
                raise ValueError(f"{' / '.join(ignored)}: for causal LMs only; MODEL_DIR is a "
                                 f"{kind} (scored on sentences)")
            protocol, rows, inputs = _encoder_rows(model, ref_model, tokenizer, text)
            timed = f"one forward pass on a batch of {inputs['input_ids'].shape[0]} sentences"
    except (ValueError, TypeError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")

    def timing(m: torch.nn.Module) -> str:
        with torch.inference_mode():
            return f"{1000 * latency(lambda: m(**inputs), warmup=1, repeats=repeats):.1f} ms"

    rows.append((f"latency (median of {repeats})", timing(model),
                 timing(ref_model) if ref_model is not None else ""))
    rows.append(("weight memory (params + buffers)", human_bytes(weight_bytes(model)),
                 human_bytes(weight_bytes(ref_model)) if ref_model is not None else ""))
    console.print(f"model: {model_dir} ({kind})" + (f"; reference: {reference}" if reference
                                                      else ""))
    for line in protocol:
        console.print(line, highlight=False)
    console.print(f"latency: {timed}, {torch.get_num_threads()} torch threads, wall clock",
                  highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("model", justify="right")
    if ref_model is not None:
        table.add_column("reference", justify="right")
    for name, value, ref_value in rows:
        table.add_row(name, value, *([ref_value] if ref_model is not None else []))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
