"""`lowbit qat`: quantization-aware fine-tuning of a causal LM, resumable, then packed and saved."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowbit.cli.common import console, err_console, fail
from lowbit.io.save import check_out_dir
from lowbit.spec import PRESETS, SPEC_STRING_SYNTAX, as_spec

CHECKPOINT = "last.pt"


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, then rename over the previous checkpoint."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _save_keeping_checkpoints(model, out_dir: Path, float_dtype=None):
    """lowbit.save replaces OUT_DIR; the checkpoints move aside and back, so ``--resume`` with a
    larger ``--steps`` can continue a finished run."""
    import lowbit

    ckpt_dir = out_dir / "checkpoints"
    aside = out_dir.parent / f".{out_dir.name}.checkpoints"
    if ckpt_dir.is_dir():
        os.replace(ckpt_dir, aside)
    try:
        return lowbit.save(model, out_dir, overwrite=True, float_dtype=float_dtype)
    finally:
        if aside.is_dir():
            out_dir.mkdir(parents=True, exist_ok=True)
            os.replace(aside, ckpt_dir)


def _embeddings_and_head(model) -> list[str]:
    """The default ``--exclude``: every nn.Embedding and the output embedding (lm_head, or the
    module tied to the input embedding), by type rather than by name (GPT-2's are wte / wpe)."""
    from torch import nn

    names = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names += [name for name, m in model.named_modules() if head is not None and m is head]
    return list(dict.fromkeys(names)) or ["lm_head"]


def _check_settings(saved: dict | None, now: dict, path: Path) -> None:
    """A resumed run must train what the checkpoint trained: one line naming what differs."""
    if saved is None:
        return  # a checkpoint written before settings were stored
    for key, value in now.items():
        if key in saved and saved[key] != value:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: {option} is {value!r}, the checkpoint {path} was "
                             f"trained with {saved[key]!r}; pass the same {option}")


def qat_command(
    model_dir: str = typer.Argument(..., help="A Hugging Face causal-LM folder."),
    scheme: str = typer.Option("w2g64", "--scheme", "-s", help=(
        "An integer preset: weight-only (w2g64, w3g128, w4g128, w8, ...) or W8A8 (w8a8, "
        "w8a8-static: activations fake-quantized too).")),
    text: Path = typer.Option(..., "--text", help="Training text file (UTF-8)."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(0.02, "--lr", help=(
        "Adam step of scales relative to their size (0.02 = 2%), and of zero-points in code "
        "units.")),
    weight_lr: float = typer.Option(1e-4, "--weight-lr", help="Adam lr of weights (--train all)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
    distill: bool = typer.Option(False, "--distill", help="KL from the float model as teacher."),
    train: str = typer.Option("all", "--train", help="scales (E2E-QP) | all (weights too)."),
    learn: str = typer.Option("lsq", "--learn", help="lsq | lsq+ | fixed."),
    init: str = typer.Option("rtn", "--init", help="rtn | hqq (initial qparams)."),
    exclude: list[str] | None = typer.Option(
        None, "--exclude", help="Keep modules matching this pattern in float (repeatable; "
        "default lm_head and embeddings)."
    ),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between saves."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT_DIR/checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch sampling."),
    out_dir: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
) -> None:
    """Fine-tune with fake-quantized weights (STE, LSQ), convert to packed modules and save."""
    import torch

    from lowbit.algorithms import qat
    from lowbit.calib.batches import position_limit
    from lowbit.models.hf import load_hf_model, source_float_dtype

    ckpt_path = out_dir / "checkpoints" / CHECKPOINT
    try:
        try:
            as_spec(scheme)
        except ValueError:
            raise ValueError(f"unknown scheme {scheme!r}; allowed: a preset "
                             f"({', '.join(PRESETS)}) or a spec string {SPEC_STRING_SYNTAX}"
                             ) from None
        if steps <= 0:
            raise ValueError(f"--steps {steps}; allowed: a positive int")
        if checkpoint_every <= 0:
            raise ValueError(f"--checkpoint-every {checkpoint_every}; allowed: a positive int")
        if not text.is_file():
            raise ValueError(f"--text {str(text)!r} is not a file; a UTF-8 text file is expected")
        if resume and not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        if not resume and out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"--output {str(out_dir)!r} is not empty; use --resume to continue "
                             "its run or pick a new folder")
        check_out_dir(out_dir, overwrite=True)  # the final save would refuse it after training
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, tokenizer, kind = load_hf_model(model_dir)
        if kind != "causal-lm" or tokenizer is None:
            raise ValueError(f"MODEL_DIR {model_dir!r}: QAT trains causal LMs with a tokenizer")
        limit = position_limit(model)
        if limit is not None and seq_len > limit:
            raise ValueError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
        try:
            training_text = text.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--text {str(text)!r} is not UTF-8 text") from None
        ids = tokenizer(training_text, return_tensors="pt", verbose=False).input_ids[0]
        qat.check_stream(ids, batch_size, seq_len)
        teacher = None
        if distill:
            import copy

            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        excl = list(exclude) if exclude else _embeddings_and_head(model)
        # static activation steps start from the range of the first training windows
        n_calib = min(8, ids.numel() // seq_len)
        calib = ids[: n_calib * seq_len].reshape(n_calib, seq_len)
        qat.prepare(model, scheme, learn=learn, init=init, train=train, exclude=excl,
                    calib=calib, calib_samples=n_calib, calib_seq_len=seq_len)
        optimizer = qat.make_optimizer(model, lr, weight_lr)
        # what a resumed run must share with the run that wrote the checkpoint
        settings = {"scheme": scheme, "learn": learn, "train": train, "init": init,
                    "exclude": excl, "batch_size": batch_size, "seq_len": seq_len,
                    "seed": seed, "distill": distill}
        start = 0
        if resume:
            state = torch.load(ckpt_path, weights_only=True)
            _check_settings(state.get("settings"), settings, ckpt_path)
            model.load_state_dict(state["model"])
            rates = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate  # this run's --lr / --weight-lr, not the checkpoint's
            start = int(state["step"])
    except (ValueError, TypeError) as e:
        fail(str(e))

    def checkpoint(step_done: int) -> None:
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "settings": settings,
                                     "optimizer": optimizer.state_dict(), "step": step_done})

    progress = Progress(
        TextColumn("qat"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("loss {task.description}"), console=err_console,
    )
    losses: list[float] = []
    with progress:
        task = progress.add_task("-", total=steps, completed=start)

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            progress.update(task, advance=1, description=f"{loss:.4f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                checkpoint(step + 1)

        try:
            if start < steps:
                qat.train(model, ids, steps, optimizer, batch_size=batch_size, seq_len=seq_len,
                          teacher=teacher, start_step=start, seed=seed, on_step=on_step)
        except qat.DivergedError as e:
            progress.stop()
            kept = (f"the last good checkpoint {ckpt_path} is kept (resume with --resume and a "
                    "lower --lr)") if ckpt_path.is_file() else "no checkpoint was written yet"
            fail(f"{e}; stopped, {kept}")
    try:
        qat.convert(model)
        result = _save_keeping_checkpoints(model, out_dir,
                                           source_float_dtype(model_dir, model))
    except (ValueError, TypeError) as e:
        fail(str(e))
    first = f"{losses[0]:.4f}" if losses else "-"
    last = f"{losses[-1]:.4f}" if losses else "-"
    console.print(
        f"qat {scheme} ({learn}, train {train}{', distilled' if distill else ''}): steps "
        f"{start}->{steps}, loss {first} -> {last}; saved {result.path} "
        f"({result.file_bytes:,} B)"
    )


def register(app: typer.Typer) -> None:
    app.command("qat")(qat_command)
