"""`lowbit quantize`: load a Hugging Face model folder, quantize it, save the packed checkpoint."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from lowbit.cli.common import console, err_console, fail
from lowbit.eval.size import human_bytes
from lowbit.io import compressed_tensors as ct
from lowbit.io.save import SAVE_FORMATS
from lowbit.kernels.dispatch import kernel_plan
from lowbit.models.hf import source_float_dtype
from lowbit.spec import PRESETS, SPEC_STRING_SYNTAX, QuantSpec, as_spec, preset

MODES = ("weight", "dynamic", "static")
DYNAMIC_PRESET = "w8a8"
STATIC_PRESET = "w8a8-static"
# Skip reasons listed one module per row up to this many; beyond, rows are collapsed by reason.
MAX_SKIP_ROWS = 6


def resolve_scheme(scheme: str | None, mode: str | None) -> tuple[QuantSpec, str]:
    """The spec for ``--scheme`` under ``--mode``; returns ``(spec, mode)``.

    weight: the preset as is. dynamic / static: a W*A* preset of that kind as is; an int8 weight
    scheme becomes the W8A8 preset with dynamic per-token or calibrated per-tensor activations;
    other weight formats are refused.
    """
    if scheme is None:  # by mode: the W8A8 preset of --mode dynamic / static, else w4g128
        if mode in ("dynamic", "static"):
            return preset(DYNAMIC_PRESET if mode == "dynamic" else STATIC_PRESET), mode
        scheme = "w4g128"
    try:
        spec = as_spec(scheme)
    except ValueError:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: a preset ({', '.join(PRESETS)}) "
                         f"or a spec string {SPEC_STRING_SYNTAX}") from None
    if mode is None:
        mode = "weight" if spec.act is None else ("dynamic" if spec.act.dynamic else "static")
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "weight":
        if spec.act is not None:
            raise ValueError(
                f"scheme {scheme!r} quantizes activations; use --mode "
                f"{'dynamic' if spec.act.dynamic else 'static'} or a weight-only scheme"
            )
        return spec, mode
    if spec.act is not None and spec.act.dynamic == (mode == "dynamic"):
        return spec, mode  # a W*A* preset (w8a8, w7a8, w8a7, fp8a8, ...) as it is
    if spec.format != "int8":
        raise ValueError(
            f"--mode {mode} runs int8 x int8 (W8A8); scheme {scheme!r} has {spec.format} weights; "
            "use --scheme w8 or --mode weight"
        )
    return preset(DYNAMIC_PRESET if mode == "dynamic" else STATIC_PRESET), mode


def read_calib(path: Path) -> list[str]:
    """The calibration text file as a list of non-empty paragraphs."""
    if not path.is_file():
        raise ValueError(f"--calib {str(path)!r} is not a file; a UTF-8 text file is expected")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--calib {str(path)!r} is not UTF-8 text") from None
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"--calib {str(path)!r} is empty; calibration needs text")
    return paragraphs


def _candidates(model, include: list[str] | None, exclude: list[str]) -> int:
    """Number of modules quantize() will consider after --include / --exclude."""
    from lowbit.io.save import float_module_kind
    from lowbit.models.select import first_match

    n = 0
    for name, module in model.named_modules():
        if float_module_kind(module) is None:
            continue
        if include and first_match(name, include) is None:
            continue
        if first_match(name, exclude) is not None:
            continue
        n += 1
    return n


def _explain(error: str) -> str:
    """Add the CLI remedy to errors quantize() reports for one layer."""
    if error.startswith("layer ") and "does not divide" in error:
        layer = error.split("'")[1]
        return f"{error}; or keep it in float with --exclude {layer!r}"
    return error


def quantize_command(
    model_dir: str = typer.Argument(..., help="A Hugging Face model folder (or a hub id)."),
    scheme: str | None = typer.Option(
        None, "--scheme", "-s",
        help="A preset (lowbit formats); default w4g128, or w8a8 / w8a8-static for --mode "
             "dynamic / static."),
    mode: str | None = typer.Option(
        None, "--mode", help="weight | dynamic (W8A8 per-token) | static (W8A8, needs --calib)."
    ),
    calib: Path | None = typer.Option(
        None, "--calib", help="Calibration text file (--mode static, or a calibration algorithm)."
    ),
    algorithm: str = typer.Option(
        "rtn", "--algorithm", "-a",
        help="rtn | gptq | gptq-act-order | hqq | awq | smoothquant (registered algorithms).",
    ),
    calib_samples: int | None = typer.Option(
        None, "--calib-samples", help="Calibration sequences (--mode static or a calibration "
        "algorithm). \\[default: 128]"),
    calib_seq_len: int | None = typer.Option(
        None, "--calib-seq-len", help="Tokens per sequence. \\[default: 512]"),
    calib_batch_size: int | None = typer.Option(None, "--calib-batch-size", help=(
        "Sequences per calibration forward (lower it to bound activation memory). "
        "\\[default: 8]")),
    observer: str | None = typer.Option(
        None, "--observer", help="Activation observer for --mode static (default minmax)."
    ),
    moe_calibration: str | None = typer.Option(
        None, "--moe-calibration", help="What MoE experts see while calibrating: 'all' "
        "tokens, or the tokens 'routed' to them (see lowbit.quantize). \\[default: all]"),
    include: list[str] | None = typer.Option(
        None, "--include", help="Only modules matching this glob / re: pattern (repeatable)."
    ),
    exclude: list[str] | None = typer.Option(
        None, "--exclude", help="Keep modules matching this pattern in float (repeatable)."
    ),
    bits: float | None = typer.Option(
        None, "--bits", help=(
            "Mixed precision: with -s naming two or more weight-only specs (-s w3g128,w4g128), "
            "measure each layer's KL (relative output error for models without logits) with "
            "each spec on --sensitivity-samples x --sensitivity-seq-len tokens of --calib and "
            "choose the specs with the least total at this many bits per weight.")),
    sensitivity_samples: int | None = typer.Option(
        None, "--sensitivity-samples", help="Sequences --bits measures each layer on. "
        "\\[default: 8]"),
    sensitivity_seq_len: int | None = typer.Option(
        None, "--sensitivity-seq-len", help="Tokens per sequence for --bits. \\[default: 256]"),
    sensitivity_file: Path | None = typer.Option(
        None, "--sensitivity-file", help=(
            "JSON file of the --bits measurement: written after measuring; when it exists "
            "(same model layers, specs and calibration tokens) it is read instead, so other "
            "budgets take seconds.")),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder to write (must not exist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    save_format: str = typer.Option(
        "lowbit", "--format", help=(
            "Checkpoint format: lowbit (read by lowbit.load; every spec), compressed-tensors "
            "(read by vLLM, transformers with the compressed-tensors package and lowbit.load; "
            "integer and fp8 specs, Linear layers: Embedding / Conv layers stay float) or gguf "
            "(OUT_DIR/model.gguf for llama.cpp; llama / mistral models, specs q4_0, q8_0, "
            "q5_0, q4_1, q5_1 and the k-quants q2_k ... q6_k, whose layers with rows "
            "not a multiple of 256 take llama.cpp's fallback type).")),
) -> None:
    """Quantize a model and write safetensors + config.json (see docs/format.md)."""
    import lowbit
    from lowbit.algorithms import get_algorithm
    from lowbit.io.save import check_out_dir
    from lowbit.models.hf import load_hf_model

    try:
        candidates = None
        if bits is not None or (scheme is not None and "," in scheme):
            candidates = mixed_candidates(scheme, mode, bits)
            scheme = candidates[0]
        spec, mode = resolve_scheme(scheme, mode)
        alg = get_algorithm(algorithm)
        texts = None
        if candidates is not None and calib is None:
            raise ValueError("--bits measures each layer on --calib FILE (a text file); pass it")
        if mode == "static" or alg.needs_calibration or candidates is not None:
            if calib is None:
                needs = "--mode static" if mode == "static" else f"--algorithm {algorithm}"
                raise ValueError(f"{needs} needs --calib FILE (a text file)")
            texts = read_calib(calib)
        elif calib is not None:
            raise ValueError(
                f"--calib is used by --mode static, --bits or a calibration algorithm only "
                f"(mode is {mode}, algorithm {algorithm})"
            )
        sizes = (("--calib-samples", calib_samples), ("--calib-seq-len", calib_seq_len),
                 ("--calib-batch-size", calib_batch_size))
        for opt, value in (*sizes, ("--sensitivity-samples", sensitivity_samples),
                           ("--sensitivity-seq-len", sensitivity_seq_len)):
            if value is not None and value < 1:
                raise ValueError(f"{opt} {value}; allowed: a positive int")
        given = [opt for opt, value in sizes if value is not None]
        if given and not (mode == "static" or alg.needs_calibration):
            raise ValueError(
                f"{given[0]} sizes the calibration of --mode static or a calibration algorithm "
                f"(mode is {mode}, algorithm {algorithm})"
                + ("; --bits measures on --sensitivity-samples / --sensitivity-seq-len"
                   if candidates is not None else ""))
        if moe_calibration is not None:
            if moe_calibration not in ("all", "routed"):
                raise ValueError(f"--moe-calibration {moe_calibration}; allowed: all, routed")
            if not (mode == "static" or alg.needs_calibration):
                raise ValueError(f"--moe-calibration is for --mode static or a calibration "
                                 f"algorithm (mode is {mode}, algorithm {algorithm})")
        calib_samples, calib_seq_len, calib_batch_size = (
            calib_samples or 128, calib_seq_len or 512, calib_batch_size or 8)
        if candidates is None and (sensitivity_samples, sensitivity_seq_len,
                                   sensitivity_file) != (None, None, None):
            raise ValueError("--sensitivity-samples / --sensitivity-seq-len / "
                             "--sensitivity-file are for the measurement of --bits; pass --bits")
        sensitivity_samples, sensitivity_seq_len = (sensitivity_samples or 8,
                                                    sensitivity_seq_len or 256)
        if sensitivity_file is not None and sensitivity_file.exists() and \
                not sensitivity_file.is_file():
            raise ValueError(f"--sensitivity-file {str(sensitivity_file)!r} is not a file")
        if sensitivity_file is not None and not sensitivity_file.parent.is_dir():
            raise ValueError(f"--sensitivity-file {str(sensitivity_file)!r}: its folder does "
                             "not exist")
        if observer is not None:
            from lowbit.observers import OBSERVERS

            if mode != "static":
                raise ValueError(f"--observer is used by --mode static only (mode is {mode})")
            if observer not in OBSERVERS:
                raise ValueError(
                    f"unknown observer {observer!r}; allowed: {', '.join(sorted(OBSERVERS))}"
                )
        check_out_dir(out_dir, overwrite)
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"--format {save_format}; allowed: {', '.join(SAVE_FORMATS)}")
        if save_format != "lowbit":
            _check_exportable(save_format, spec, candidates, alg, Path(model_dir))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar follows; theirs would interleave
        if alg.needs_calibration and Path(model_dir).is_dir() and candidates is None:
            kind = _check_folder(Path(model_dir))
            model = None  # memory bounded: quantize() reads one block at a time from disk
        else:
            model, tokenizer, kind = load_hf_model(model_dir)
    except (ValueError, TypeError, ImportError) as e:  # ImportError: an export's package
        fail(str(e))

    include_list = list(include) if include else None
    exclude_list = list(exclude or [])
    if save_format == ct.FORMAT_NAME:
        float_model = model if model is not None else _meta_model(Path(model_dir))
        try:
            _check_no_experts(float_model, spec, include_list, exclude_list)
        except ValueError as e:
            fail(str(e))
        kept = ct.float_only_layers(float_model)
        if kept:
            err_console.print(f"compressed-tensors: {len(kept)} Embedding / Conv layers stay "
                              "float (its runtimes quantize Linear layers)")
        exclude_list += kept
    if save_format == "gguf" and candidates is None:
        from lowbit.io import gguf

        float_model = model if model is not None else _meta_model(Path(model_dir))
        spec = gguf.k_quant_fallbacks(float_model, spec)
        if len(spec) > 1:
            fallback = next(iter(spec.values()))
            err_console.print(f"gguf: {len(spec) - 1} layers whose rows are not a multiple of "
                              f"{gguf.K_BLOCK} weights take {fallback} (llama.cpp's fallback "
                              f"for {spec['*']})")
    if candidates is not None:
        try:
            plan = _mixed_plan(model, candidates, bits, texts, tokenizer, include_list,
                               exclude_list, sensitivity_samples, sensitivity_seq_len,
                               sensitivity_file)
        except (ValueError, TypeError) as e:
            fail(_explain(str(e)))
        _print_plan(plan, candidates)
        spec = plan.specs
    if model is None:
        try:
            model = lowbit.quantize(
                model_dir, spec, algorithm=alg, calib=texts, include=include_list,
                exclude=exclude_list, observer=observer or "minmax",
                calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                calib_batch_size=calib_batch_size, show_progress=True,
                moe_calibration=moe_calibration or "all",
            )
            result = lowbit.save(model, out_dir, overwrite=overwrite, format=save_format,
                                 float_dtype=source_float_dtype(model_dir, model))
        except (ValueError, TypeError) as e:
            fail(_explain(str(e)))
        _print_report(model, result, model_dir, mode, kind, save_format)
        return

    total = _candidates(model, include_list, exclude_list)
    progress = Progress(
        TextColumn("quantizing"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.description}"), console=err_console, transient=True,
    )
    try:
        with progress:
            task = progress.add_task("", total=total)

            def advance(name: str) -> None:
                progress.update(task, advance=1, description=name)

            lowbit.quantize(
                model, spec, calib=texts if mode == "static" or alg.needs_calibration else None,
                include=include_list,
                exclude=exclude_list, observer=observer or "minmax", tokenizer=tokenizer,
                progress=advance, algorithm=alg, calib_samples=calib_samples,
                calib_seq_len=calib_seq_len, calib_batch_size=calib_batch_size,
                moe_calibration=moe_calibration or "all",
            )
        if candidates is not None:
            sens = plan.sensitivity
            what = "KL" if sens.metric == "kl" else "relative output error"
            model.lowbit_summary.notes.append(
                f"mixed precision: each layer's spec chosen among {', '.join(candidates)} for "
                f"the least summed {what} at {bits:g} bits per weight (measured with each layer "
                f"quantized alone on {sens.n_positions:,} positions of the calibration text)")
        result = lowbit.save(model, out_dir, overwrite=overwrite, format=save_format,
                             float_dtype=source_float_dtype(model_dir, model))
    except (ValueError, TypeError) as e:
        fail(_explain(str(e)))
    _print_report(model, result, model_dir, mode, kind, save_format)


def mixed_candidates(scheme: str | None, mode: str | None, bits: float | None) -> list[str]:
    """The specs of ``-s a,b,...`` for ``--bits``: two or more, weight-only, each one valid."""
    names = [n.strip() for n in (scheme or "").split(",") if n.strip()]
    if bits is None:
        raise ValueError(f"--scheme {scheme!r} names several specs; pass --bits N to choose "
                         "among them per layer (mixed precision), or name one")
    if len(names) < 2:
        raise ValueError(f"--bits chooses per layer among the specs of --scheme; name two or "
                         f"more, comma-separated (e.g. -s w3g128,w4g128), got {scheme!r}")
    if mode not in (None, "weight"):
        raise ValueError(f"--bits mixes weight-only specs; --mode {mode} is not allowed with it")
    for name in names:
        resolve_scheme(name, "weight")  # a bad name fails here, with what is allowed
    return names


def _mixed_plan(model, candidates: list[str], bits: float, texts: list[str], tokenizer,
                include: list[str] | None, exclude: list[str], samples: int, seq_len: int,
                file: Path | None):
    """Measure (or read ``file``, checked against this model, specs and text) and allocate."""
    from lowbit.calib.batches import as_batches
    from lowbit.calib.sensitivity import (
        Sensitivity,
        allocate_bits,
        batches_digest,
        measure_sensitivity,
    )

    if file is not None and file.exists():
        sens = Sensitivity.load(file)
        digest = batches_digest(as_batches(texts, tokenizer, samples, seq_len))
        try:
            sens.check_matches(model, candidates, digest, include, exclude)
        except ValueError as e:
            raise ValueError(f"--sensitivity-file {str(file)!r}: {e}; delete it (or name "
                             "another file) to measure again") from None
        err_console.print(f"read the measurement from {file}")
    else:
        sens = measure_sensitivity(model, candidates, texts, tokenizer=tokenizer,
                                   include=include, exclude=exclude, calib_samples=samples,
                                   calib_seq_len=seq_len, show_progress=True)
        if file is not None:
            sens.save(file)
    return allocate_bits(sens, bits)


def _print_plan(plan, names: list[str]) -> None:
    """The mixed-precision plan: per role of layer, mean KL of each candidate and the choice
    (candidates under the names given to -s)."""
    sens = plan.sensitivity
    label = {str(as_spec(name)): name for name in names}
    unit = "KL" if sens.metric == "kl" else "rel. MSE"
    rows = plan.by_role()
    prefix = os.path.commonprefix([role for role, *_ in rows]) if len(rows) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    table = Table(title=f"mixed precision: {plan.bits_per_weight:.3f} bits per weight (budget "
                        f"{plan.bits_budget:g}); mean {unit} of a layer quantized alone, on "
                        f"{sens.n_positions:,} positions")
    table.add_column(f"layers in {prefix[:-1]}" if prefix else "layers")
    table.add_column("n", justify="right")
    for spec in sens.candidates:
        table.add_column(label[str(spec)], justify="right")
    table.add_column("chosen")
    for role, n, mean, chosen in rows:
        table.add_row(role[len(prefix):], str(n),
                      *(f"{mean[str(c)]:.2g}" for c in sens.candidates),
                      ", ".join(f"{k} x {label[v]}" for v, k in chosen.items()))
    # the summed single-layer damage of the choice next to each uniform candidate's: the
    # trade-off at a glance (a prediction from the calibration text; `lowbit eval` measures)
    n_weights = sum(la.n_weights for la in sens.layers)
    table.add_section()
    table.add_row("sum (predicted)", "", *(
        f"{sum(la.damage[str(c)] for la in sens.layers):.2g} @ "
        f"{sum(la.nbytes[str(c)] for la in sens.layers) * 8 / n_weights:.2f}b"
        for c in sens.candidates), f"{plan.predicted_damage:.2g} @ {plan.bits_per_weight:.2f}b")
    console.print(table)


def _check_exportable(save_format: str, spec, candidates: list[str] | None, alg,
                      model_dir: Path) -> None:
    """Fail before quantizing when the result could not be saved in ``save_format``."""
    from lowbit.io import gguf

    specs = [resolve_scheme(c, "weight")[0] for c in candidates] if candidates else [spec]
    if save_format == gguf.FORMAT_NAME:
        from transformers import AutoConfig

        gguf.check_model(AutoConfig.from_pretrained(model_dir), model_dir)
    for s in specs:
        (gguf.check_spec if save_format == gguf.FORMAT_NAME else ct.check_spec)(s)
        static = getattr(alg, "static_groups", None)
        if (getattr(alg, "act_order", False) and s.granularity == "group"
                and not (static if static is not None else s.bits <= 2)):
            raise ValueError(f"--algorithm gptq-act-order stores act-order groups (g_idx), "
                             f"which {save_format} does not carry; use --algorithm gptq")


def _check_no_experts(model, spec, include: list[str] | None, exclude: list[str]) -> None:
    """Fail before quantizing when the patterns select MoE experts (no export for them yet)."""
    from lowbit.models.experts import expert_linear_names, fused_experts
    from lowbit.models.select import choose_spec

    for name, module in fused_experts(model).items():
        for linear in expert_linear_names(name, module):
            if choose_spec(linear, spec, include, exclude)[0] is not None:
                raise ValueError(f"mixture-of-experts layers ({linear}, ...) have no "
                                 "compressed-tensors export in lowbit yet; keep them float "
                                 "with --exclude '*experts*' or save with --format lowbit")


def _meta_model(path: Path):
    from transformers import AutoConfig

    from lowbit.models.hf import build_on_meta, model_kind

    config = AutoConfig.from_pretrained(path)
    return build_on_meta(config, model_kind(config))


def _check_folder(path: Path) -> str:
    """Validate a model folder against its config.json without loading it; returns its kind."""
    from transformers import AutoConfig

    from lowbit.models.hf import check_weights_match_config, model_kind

    if not (path / "config.json").is_file():
        raise ValueError(f"MODEL_DIR {str(path)!r} has no config.json; a Hugging Face model "
                         "folder (config.json + *.safetensors) is expected")
    config = AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    check_weights_match_config(path, config, kind)
    return kind


def _print_report(model, result, model_dir: str, mode: str, kind: str,
                  fmt: str = "lowbit") -> None:
    summary = model.lowbit_summary
    quantized, skipped = summary.quantized, summary.skipped
    numel = sum(model.get_submodule(m.name).qweight.numel for m in quantized)
    table = Table(title=f"lowbit quantize {model_dir} ({kind}) -> {result.path}",
                  show_header=False)
    table.add_column("what")
    table.add_column("value")
    specs = Counter(m.spec for m in quantized)
    table.add_row("mode", mode)
    if fmt != "lowbit":
        table.add_row("format", "gguf (model.gguf: llama.cpp; transformers' gguf_file=)"
                      if fmt == "gguf" else f"{fmt} (read by vLLM, transformers and lowbit.load)")
    table.add_row(
        "modules quantized",
        (f"{len(quantized)}: " + ", ".join(f"{n} x {s}" for s, n in specs.items()))
        if quantized else "0",
    )
    table.add_row("modules skipped", str(len(skipped)))
    if len(skipped) <= MAX_SKIP_ROWS:
        for m in skipped:
            table.add_row(f"  {m.name}", m.reason)
    else:
        for reason, n in Counter(m.reason for m in skipped).most_common():
            table.add_row("  ", f"{n} modules: {reason}")
    before = summary.bytes_before
    after = summary.bytes_after
    stored_as = source_float_dtype(model_dir, model)
    table.add_row("weights before", f"{human_bytes(before)} ({before:,} B" + (
        f", in {str(stored_as).removeprefix('torch.')} as the source stores them)"
        if stored_as is not None else ")"))
    table.add_row("weights after", f"{human_bytes(after)} ({after:,} B)")
    if numel:
        q_after = sum(m.bytes_after for m in quantized)
        table.add_row("bits per weight", f"{q_after * 8 / numel:.3f} (quantized modules, "
                      "scales and zero-points included)")
    if stored_as is not None:
        table.add_row("float tensors", f"stored in {str(stored_as).removeprefix('torch.')}, as "
                      "in the source checkpoint")
    theoretical = result.theoretical_bytes
    table.add_row(
        "file on disk",
        f"{result.file_bytes:,} B = {theoretical:,} B of tensors ({result.quantized_bytes:,} "
        f"quantized + {result.other_bytes:,} other) + {result.header_bytes:,} B header",
    )
    errors = [(m.name, m.error) for m in quantized if m.error is not None]
    if errors:
        worst = max(errors, key=lambda e: e[1])
        mean = sum(e for _, e in errors) / len(errors)
        table.add_row("rel. output error", f"mean {mean:.4f}, worst {worst[1]:.4f} ({worst[0]}) "
                      f"over {len(errors)} layers")
    for kernel, layers in sorted(kernel_plan(model).items()):
        specs = ", ".join(sorted({spec for _, spec in layers}))
        why = (" - no fast CPU kernel for this spec: dequantize + F.linear on every call"
               if kernel == "reference" else "")
        table.add_row("kernel (CPU, fp32 input)", f"{kernel}: {len(layers)} layers ({specs}){why}")
    for note in summary.notes:
        table.add_row("note", note)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
