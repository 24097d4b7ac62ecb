"""External check: a GGUF written by llama.cpp's own converter loads in glmtg and gives the HF model's logits.

Kept out of CI (it needs llama.cpp's source tree and transformers): run by hand after changes to the GGUF
loader or the name table, e.g.

    python bench/check_llama_convert.py --llama-cpp /path/to/llama.cpp [--outtype f32 q8_0] [-o results.json]

Steps: a small GLM4-MoE in transformers (the ``tiny`` preset's shapes, every tensor random and nonzero, the
router's selection bias too) is saved as an HF checkpoint with a small byte-level BPE tokenizer that carries
GLM's special tokens; llama.cpp's ``convert_hf_to_gguf.py`` converts it (in a subprocess, with its own gguf-py;
the tokenizer is not GLM's, so the converter's pre-tokenizer lookup is told "glm4" — the check is about
weights, names, the Q/K row order and hparams, not the vocabulary); glmtg loads the GGUF and its logits on
random token ids are compared with transformers' (float32, eager attention).

Tolerances: f32 file, float32 model — max |Δlogit| <= 1e-3 (float32 round-off through a few layers, different
summation orders); q8_0 file — the logits move by the quantization error, so the check reports the max
difference, the KL divergence and top-1 agreement, and requires a mean KL divergence <= 1e-3 (q8_0 files of
real GLM models measure ~1e-4 to 1e-3 against bf16; an error in a tensor's mapping gives KLD of order 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmtg.config import ModelConfig  # noqa: E402
from tests.references.model import hf_reference  # noqa: E402

_PATCHED_CONVERT = """
import sys
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
sys.path.insert(0, {root!r})
import runpy
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
runpy.run_path({script!r}, run_name="__main__")
"""

SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
           "<|assistant|>", "<|observation|>"]


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of vocab_size ids whose last ids are GLM's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = []
    pairs = [(a, b) for a in "etaoinsr" for b in "etaoinsr"]
    for a, b in pairs:
        if len(vocab) >= vocab_size - len(SPECIAL):
            break
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    fast.save_pretrained(directory)


def convert(llama_cpp: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    script = llama_cpp / "convert_hf_to_gguf.py"
    code = _PATCHED_CONVERT.format(root=str(llama_cpp), script=str(script))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, str(model_dir), "--outfile", str(outfile), "--outtype", outtype],
                   check=True, env=env, cwd=llama_cpp)


def compare(gguf_path: Path, hf, config: ModelConfig, seq: int, seed: int) -> dict:
    from glmtg.loading.gguf_model import load_gguf_model
    from tests.references.model import new_cache  # float32 K/V: the comparison is at fp32 round-off

    model, loaded_config = load_gguf_model(gguf_path, device="cpu", dtype=torch.float32, progress=False)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - len(SPECIAL), (1, seq), generator=gen)
    with torch.no_grad():
        want = hf(input_ids=ids, use_cache=False).logits.float()
        cache = new_cache(loaded_config, batch=1, capacity=seq)
        got = model(ids, cache, attn_backend="eager")
    diff = (got - want).abs().max().item()
    logp, logq = want.log_softmax(-1), got.log_softmax(-1)
    kld = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "mean_kld": kld, "top1_agreement": top1, "positions": seq}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--outtype", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--label", help="how the llama.cpp tree is named in the output (default: its path)")
    args = ap.parse_args()
    config = ModelConfig.preset("tiny")
    hf = hf_reference(config, args.seed)  # every tensor random and nonzero, the selection bias too
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "hf"
        hf.save_pretrained(model_dir, safe_serialization=True)
        save_tokenizer(model_dir, config.vocab_size)
        for outtype in args.outtype:
            out = Path(tmp) / f"model-{outtype}.gguf"
            convert(args.llama_cpp, model_dir, out, outtype)
            results[outtype] = compare(out, hf, config, args.seq, args.seed + 1)
            print(outtype, json.dumps(results[outtype]))
    ok = True
    for outtype, r in results.items():
        passed = r["max_abs_diff"] <= 1e-3 if outtype == "f32" else r["mean_kld"] <= 1e-3
        r["passed"] = passed
        ok &= passed
    if args.output:
        import datetime

        meta = {"llama_cpp": args.label or str(args.llama_cpp), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        args.output.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
