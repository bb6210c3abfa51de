"""Does llama.cpp compute what lowbit computes for its GGUF exports? Exactness checks of the
export (rotary scaling, tokenizers), not an accuracy benchmark.

1. Llama 3: a tiny random Llama (2 layers, hidden 128, 4 heads / 2 KV heads, head_dim 32) with
   Llama 3's rotary scaling (theta 500000, factor 8, low / high frequency factors 1 / 4,
   original context 8192) and a tokenizer with Llama 3's split regex (the fixture's BPE
   vocabulary and merges), exported F32, and once more without its ``rope_freqs`` tensor (what
   the export would be without the scaling).
2. SentencePiece: the same tiny Llama shape (default rotary) with a SentencePiece BPE tokenizer
   trained here on the val text as Llama 2's is (identity normalization, byte fallback, digits
   split, 600 pieces), ``tokenizer.model`` plus the ``tokenizer.json`` transformers converts
   from it; exported F32.

llama.cpp (``--llama-python``: a venv with llama-cpp-python and numpy) evaluates 600 positions
of the val text; the table gives the largest |logit difference| to lowbit's float model, and
whether llama.cpp's tokenizer (read from the GGUF) gives the HF ids on ~20,000 characters.

    .venv/bin/python benchmarks/gguf_llamacpp_check.py --llama-python /tmp/llama-venv/bin/python

Writes benchmarks/results/gguf_llamacpp_check.md (needs sentencepiece and protobuf here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gguf_llamacpp_check.md"
POSITIONS = 600


def llama_side(job_file: Path) -> None:
    """In the llama.cpp venv: logits and token ids of each GGUF, written next to the job."""
    import llama_cpp
    import numpy as np

    job = json.loads(job_file.read_text())
    out = {"version": llama_cpp.__version__, "rows": {}}
    for name, case in job.items():
        want = np.load(case["logits"])
        llm = llama_cpp.Llama(model_path=case["path"], n_ctx=1024, n_batch=1024,
                              logits_all=True, verbose=False)
        llm.eval(case["seq"])
        got = np.array(llm.scores[: len(case["seq"])])
        ids = llm.tokenize(case["text"].encode(), add_bos=False, special=False)
        out["rows"][name] = {"max_diff": float(np.abs(got - want).max()),
                             "scale": float(np.abs(want).max()),
                             "tokenizer_ok": [int(i) for i in ids] == case["ids"],
                             "tokens": len(case["ids"]), "chars": len(case["text"])}
        if "special" in case:  # text with special tokens written in it, parsed as such
            ids = [int(i) for i in llm.tokenize(case["special"]["text"].encode(),
                                                add_bos=False, special=True)]
            out["rows"][name]["special"] = {k: ids == case["special"][k]
                                            for k in ("sentencepiece", "hf")}
    (job_file.parent / "result.json").write_text(json.dumps(out))


def _sentencepiece_tokenizer(folder: Path, text: str) -> None:
    """tokenizer.model (SentencePiece BPE trained on ``text`` as Llama 2's) and tokenizer.json."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    (folder / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "sp"), model_type="bpe",
        vocab_size=600, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    for name in ("train.txt", "sp.vocab"):
        (folder / name).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np
    import torch
    from _machine import SHARED, VAL, machine_line, run_llama_job
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    import lowbit.io.gguf as lowbit_gguf
    from lowbit.models.hf import load_hf_model

    fixture = SHARED / "models" / "llama-3m-shakespeare-mix"
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-check-"))
    val = VAL.read_text(encoding="utf-8")
    text = val[:20_000] + " 1234567 12 abc's WE'RE  \n\n  x \u00fcber na\u00efve \u2014 \U0001f600"
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, max_position_embeddings=131072,
                                 rope_parameters=rope, **shape)).save_pretrained(work / "llama3")
    spec = json.loads((fixture / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": lowbit_gguf.LLAMA3_SPLIT},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    (work / "llama3" / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixture / name, work / "llama3" / name)
    LlamaForCausalLM(LlamaConfig(vocab_size=640, **shape)).save_pretrained(work / "sp")
    _sentencepiece_tokenizer(work / "sp", val[-300_000:])

    job = {}

    def special_case(folder: str) -> dict:
        """Ids of a chat-like text with special tokens and leading spaces: by SentencePiece's
        own rule (each text run between special tokens encoded with the space prefix, as
        llama.cpp's "llama" tokenizer does) and by the HF tokenizer."""
        import re

        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(work / folder / "tokenizer.model"))
        chat = "<s>[INST] Hello  there [/INST] Fine, thanks.</s><s>[INST]  again [/INST]"
        by_sp = []
        for part in re.split(r"(<s>|</s>)", chat):
            by_sp += [sp.piece_to_id(part)] if part in ("<s>", "</s>") else sp.encode(part)
        hf = load_hf_model(work / folder)[1](chat, add_special_tokens=False)["input_ids"]
        return {"text": chat, "sentencepiece": by_sp, "hf": hf}

    def case(name: str, folder: str, export: str) -> None:
        model, tokenizer, _ = load_hf_model(work / folder)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([ids[:POSITIONS]])
        with torch.no_grad():
            np.save(work / f"{export}.npy", model(seq).logits[0].numpy())
        lowbit.save(model, work / export, format="gguf", float_dtype=torch.float32)
        job[name] = {"path": str(work / export / "model.gguf"),
                     "logits": str(work / f"{export}.npy"), "seq": seq[0].tolist(),
                     "text": text, "ids": ids}

    case("Llama 3 scaling + split, F32 with rope_freqs (lowbit's export)", "llama3", "l3")
    factors = lowbit_gguf._rope_freq_factors
    lowbit_gguf._rope_freq_factors = lambda *a, **k: None  # the export without the scaling
    case("Llama 3 scaling + split, F32 without rope_freqs (control)", "llama3", "l3-no-freqs")
    lowbit_gguf._rope_freq_factors = factors
    case("SentencePiece BPE tokenizer (Llama 2's kind), F32", "sp", "sp-f32")
    job["SentencePiece BPE tokenizer (Llama 2's kind), F32"]["special"] = special_case("sp")
    result = run_llama_job(args.llama_python, __file__, work, job)
    lines = ["# lowbit's GGUF exports in llama.cpp: rotary scaling and tokenizers", "",
             f"Written by `benchmarks/gguf_llamacpp_check.py` on {date.today().isoformat()}. "
             f"Machine: {machine_line()}. llama-cpp-python {result['version']} (llama.cpp built "
             "from source here).", "",
             "Tiny random Llamas (2 layers, hidden 128, head_dim 32, GQA 4 / 2). Llama 3 rows: "
             "Llama 3's rotary scaling (theta 500000, factor 8, low / high frequency factors "
             "1 / 4, original context 8192) and Llama 3's split regex over the fixture's BPE "
             "vocabulary. SentencePiece row: default rotary, a 600-piece SentencePiece BPE "
             f"tokenizer trained on the end of {VAL.name} (identity normalization, byte "
             "fallback, digits split, as Llama 2's). All exported F32. Logits: llama.cpp vs "
             f"lowbit's float model on {POSITIONS} positions of {VAL.name}; tokenizer: "
             "llama.cpp's ids (from the GGUF, no BOS) vs HF's (no special tokens) on the first "
             "20,000 characters of the val text plus digits, spaces, newlines, accents, a dash "
             "and an emoji (byte fallback).", "",
             "| GGUF | max abs logit diff | largest abs logit | tokenizer ids equal |",
             "|---|---:|---:|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['max_diff']:.2g} | {row['scale']:.3g} | "
                     f"{'yes' if row['tokenizer_ok'] else 'NO'} ({row['tokens']:,} tokens) |")
    for name, row in result["rows"].items():
        if "special" in row:
            chat = job[name]["special"]["text"]
            lines += ["", f"Special tokens written in the text ({name}): llama.cpp's ids for "
                      f"`{chat}` (special tokens parsed) equal SentencePiece's own rule (each "
                      "text run between special tokens encoded with its space prefix): "
                      f"{'yes' if row['special']['sentencepiece'] else 'NO'}; equal the HF "
                      "tokenizer's (transformers "
                      f"{__import__('transformers').__version__}, which adds no prefix after "
                      "a special token and one '\u2581' for a leading space): "
                      f"{'yes' if row['special']['hf'] else 'no'}."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-job":
        llama_side(Path(sys.argv[2]))
    else:
        sys.exit(main())
