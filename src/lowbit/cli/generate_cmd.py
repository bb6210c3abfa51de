"""`lowbit generate`: text from a (quantized) causal LM with lowbit's Decoder, and its speed."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from lowbit.cli.common import console, fail
from lowbit.cli.eval_cmd import load_model
from lowbit.nn.modules import QuantLinear


def _timed_generate(decoder, ids: torch.Tensor, new: int, **kwargs) -> tuple[torch.Tensor, float]:
    # warm-up (binds kernel caches), greedy: sampling would draw from the caller's generator
    # and make the timed run's text depend on it
    decoder.generate(ids, min(4, new), **{**kwargs, "do_sample": False, "generator": None})
    t0 = time.perf_counter()
    out = decoder.generate(ids, new, **kwargs)
    return out, time.perf_counter() - t0


class _TransformersRuntime:
    """``Decoder.generate``'s interface over the model's own ``generate``: for architectures
    lowbit's Decoder does not run (DeepSeek, gpt-oss, OLMoE: other attention or MLP shapes)."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, ids: torch.Tensor, new: int, *, do_sample: bool, temperature: float,
                 top_k: int | None, eos_token_id: int | None, pad_token_id: int,
                 attention_mask: torch.Tensor, generator: torch.Generator | None
                 ) -> torch.Tensor:
        from transformers import GenerationConfig

        if generator is not None:  # transformers samples from the global generator
            torch.manual_seed(int(generator.initial_seed()))
        # the flags only, as the Decoder reads them: not the checkpoint's generation_config
        # (its repetition_penalty / top_p would change "greedy" and sampled text)
        config = GenerationConfig(
            max_new_tokens=new, do_sample=do_sample, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, temperature=temperature if do_sample else None,
            top_k=(top_k or 0) if do_sample else None, top_p=None)
        saved = self.model.generation_config  # generate() fills unset fields from it
        self.model.generation_config = config
        try:
            with torch.inference_mode():
                return self.model.generate(ids, attention_mask=attention_mask,
                                           generation_config=config)
        finally:
            self.model.generation_config = saved


def _runtime(model, batch: int, length: int) -> tuple[object, str, str | None]:
    """lowbit's Decoder where it runs the architecture, else transformers' generate; its
    label, and why the Decoder was not used (None when it is)."""
    import lowbit
    from lowbit.models.decode import _check_supported

    try:
        _check_supported(model, length)
    except ValueError as e:
        return _TransformersRuntime(model), "transformers generate", str(e).split(" (use ")[0]
    return lowbit.Decoder(model, batch, length), "lowbit Decoder", None


def generate_command(
    model_dir: Path = typer.Argument(
        ..., help="A Hugging Face or lowbit-quantized causal LM folder."
    ),
    prompts: list[str] = typer.Option(
        ..., "--prompt", "-p", help="Text to continue; repeat for a batch (left-padded)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    scheme: str | None = typer.Option(
        None, "--scheme", "-s", help="Quantize the loaded model with this preset first (RTN)."
    ),
    compare: bool = typer.Option(
        False, "--compare", help="Also time the float model (same runtime) and transformers' "
        "generate, and print the speedups."
    ),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k likeliest tokens."),
    seed: int = typer.Option(0, "--seed", help="Random seed for --sample."),
    stop_at_eos: bool = typer.Option(
        True, "--stop-at-eos/--no-stop-at-eos", help="Stop at the tokenizer's end-of-text token."
    ),
) -> None:
    """Continue a prompt with lowbit's Decoder (static KV cache, each Linear bound to its kernel)
    and report tokens/s; --compare times the float model and transformers' generate too."""
    import lowbit

    try:
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens={max_new_tokens}; must be >= 1")
        if sample and not temperature > 0:
            raise ValueError(f"--temperature={temperature}; must be > 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--top-k={top_k}; must be >= 1")
        if not sample and (top_k is not None or temperature != 1.0):
            raise ValueError("--temperature / --top-k shape sampling; add --sample (greedy "
                             "decoding ignores them)")
        if scheme is not None:
            try:
                spec = lowbit.as_spec(scheme)
            except ValueError as e:
                raise ValueError(f"-s {scheme}: {e}") from None
            if spec.act is not None and not spec.act.dynamic:
                raise ValueError(f"-s {scheme} quantizes activations statically (needs "
                                 "calibration): quantize with lowbit quantize --mode static "
                                 "--calib ... and generate from its folder")
        model, tokenizer, kind = load_model(model_dir)
        if kind != "causal-lm":
            raise ValueError(f"MODEL_DIR is a {kind}; lowbit generate needs a causal LM")
        if tokenizer is None:
            raise ValueError(f"no tokenizer in {str(model_dir)!r}")
        if compare and any(isinstance(m, QuantLinear) for m in model.modules()):
            raise ValueError("--compare needs the float model: pass a Hugging Face folder "
                             "and quantize it here with -s")
        eos = tokenizer.eos_token_id if stop_at_eos else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        pad = pad if pad is not None else 0
        ids, mask = _encode(tokenizer, prompts, pad)
        decoding = {"do_sample": sample, "temperature": temperature, "top_k": top_k,
                    "eos_token_id": eos, "pad_token_id": pad, "attention_mask": mask}
        batch, length = ids.shape[0], ids.shape[1] + max_new_tokens
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            raise ValueError(f"the prompt ({ids.shape[1]} tokens) + -n {max_new_tokens} = "
                             f"{length} exceeds the model's {limit} positions; lower -n")
        original = copy.deepcopy(model) if compare else None
        if scheme is not None:
            if any(isinstance(m, QuantLinear) for m in model.modules()):
                raise ValueError(f"-s {scheme}: MODEL_DIR is already quantized; pass a Hugging "
                                 "Face folder to quantize here, or drop -s")
            lowbit.quantize(model, scheme)
        decoder, runtime, why_not = _runtime(model, batch, length)
    except (ValueError, TypeError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")

    def run(dec) -> tuple[torch.Tensor, float]:
        gen = torch.Generator().manual_seed(seed) if sample else None
        return _timed_generate(dec, ids, max_new_tokens, generator=gen, **decoding)

    if why_not is not None:
        console.print(f"running transformers' generate: {why_not}", highlight=False)
    try:
        out, seconds = run(decoder)
    except ValueError as e:  # e.g. the tokenizer's pad id outside the model's vocabulary
        fail(str(e))
    new = out.shape[1] - ids.shape[1]
    for row, row_mask in zip(out, mask, strict=True):
        text = row[int((row_mask == 0).sum()):]  # without the left padding
        console.print(tokenizer.decode(text, skip_special_tokens=True), highlight=False)
    console.print(
        f"\n{batch} x {new} new tokens in {seconds:.2f} s: [bold]{batch * new / seconds:.1f} "
        f"tokens/s[/] ({runtime}, {torch.get_num_threads()} threads, prompt "
        f"{ids.shape[1]} tokens, {'sampled' if sample else 'greedy'})", highlight=False,
        markup=True,
    )
    if not compare:
        return
    table = Table(title=f"tokens/s, batch {batch} (same prompts and token count)")
    for column in ("model", "runtime", "tokens/s", "vs float in the same runtime"):
        table.add_column(column, justify="right" if column != "model" else "left")
    label, tps = scheme or "as loaded", batch * new / seconds
    if isinstance(decoder, lowbit.Decoder):
        float_out, float_seconds = run(lowbit.Decoder(original, batch, length))
        float_tps = batch * (float_out.shape[1] - ids.shape[1]) / float_seconds  # (eos)
        table.add_row("float", "lowbit Decoder", f"{float_tps:.1f}", "1.00x")
        table.add_row(label, "lowbit Decoder", f"{tps:.1f}", f"{tps / float_tps:.2f}x")
    hf = {}
    with torch.inference_mode():
        for name, m in (("float", original), (label, model)):
            kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                      "pad_token_id": pad, "attention_mask": mask}
            m.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            t0 = time.perf_counter()
            m.generate(ids, **kwargs)
            hf[name] = batch * new / (time.perf_counter() - t0)
    table.add_row("float", "transformers generate", f"{hf['float']:.1f}", "1.00x")
    table.add_row(label, "transformers generate", f"{hf[label]:.1f}",
                  f"{hf[label] / hf['float']:.2f}x")
    console.print(table)
    console.print("One timed run each after a warm-up (greedy for transformers); the machine's "
                  "load moves these: benchmarks/decode.py interleaves rounds.", highlight=False)


def _encode(tokenizer, prompts: list[str], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, T]`` of the prompts, left-padded with ``pad``, and their attention mask."""
    rows = [tokenizer(p).input_ids for p in prompts]
    for p, row in zip(prompts, rows, strict=True):
        if not row:
            raise ValueError(f"--prompt {p!r} encodes to no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
