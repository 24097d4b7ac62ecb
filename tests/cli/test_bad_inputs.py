"""Bad input of every kind, as a new user would type it: one ``error: ...`` line on stderr and exit 2.

Each case runs in-process through ``glmtg.cli.main`` on the tiny preset (CPU) or on small files made
here; none of them may end in a traceback, a second stderr line, or any other exit status.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from glmtg.cli import main
from glmtg.config import ModelConfig
from glmtg.loading.names import glmtg_tensors_to_hf
from glmtg.loading.presets import random_model

TINY = ModelConfig.preset("tiny")


def _config(root: Path, **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), **changes}))
    return root


def _tokenizer(root: Path) -> None:
    vocab = {"[UNK]": 0, **{chr(c): i + 1 for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))


def _checkpoint(root: Path, change: tuple[str, torch.Tensor] | None = None) -> Path:
    _config(root)
    _tokenizer(root)
    state = dict(glmtg_tensors_to_hf(random_model(TINY, dtype=torch.float32).slot_tensors()))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if change is not None:
        state[change[0]] = change[1]
    save_file(state, str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"dir": d / "a_dir", "missing": d / "missing.txt"}
    f["dir"].mkdir()
    f["text"] = d / "text.txt"
    f["text"].write_text("glmtg reads this text as bytes; forty-odd bytes are two chunks of sixteen.")
    f["letters"] = d / "letters.txt"
    f["letters"].write_text(" ".join("abcdefghijklmnopqrstuvwxyz") * 2)  # 52 tokens of the word-level tokenizer
    f["other_text"] = d / "other.txt"
    f["other_text"].write_text("a different text, long enough for two chunks of sixteen bytes or more.")
    f["empty"] = d / "empty.txt"
    f["empty"].write_text("")
    f["binary"] = d / "binary.bin"
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["json_list"] = d / "list.json"
    f["json_list"].write_text("[1, 2]")
    f["json_strings"] = d / "strings.json"
    f["json_strings"].write_text(json.dumps({"rows": [{"n_kv": "0", "speed_tg": "fast", "speed_pp": 1}]}))
    f["json_broken"] = d / "broken.json"
    f["json_broken"].write_text('{"rows": [')
    f["kld_garbage"] = d / "garbage.kld"
    f["kld_garbage"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    f["kld_empty"] = d / "empty.kld"
    f["kld_empty"].write_bytes(b"")
    f["no_dir_out"] = d / "nowhere" / "out.json"
    f["m_file"] = f["text"]
    f["m_empty"] = d / "m_empty"
    f["m_empty"].mkdir()
    f["m_bad_json"] = d / "m_bad_json"
    f["m_bad_json"].mkdir()
    (f["m_bad_json"] / "config.json").write_bytes(b"\xff\xfe{{{")
    f["m_config_list"] = d / "m_config_list"
    f["m_config_list"].mkdir()
    (f["m_config_list"] / "config.json").write_text("[]")
    f["m_config_dir"] = d / "m_config_dir"
    (f["m_config_dir"] / "config.json").mkdir(parents=True)
    for key, value in (("rope_theta", [10000]), ("eos_token_id", 2.5), ("rope_scaling", "yarn"),
                       ("num_attention_heads", "12"), ("num_hidden_layers", True), ("vocab_size", -1),
                       ("head_dim", 3), ("hidden_size", 10**40), ("rms_norm_eps", 0), ("model_type", None)):
        f[f"m_{key}"] = _config(d / f"m_{key}", **{key: value})
    f["m_no_weights"] = _config(d / "m_no_weights")
    _tokenizer(f["m_no_weights"])
    f["m_chat"] = _config(d / "m_chat")
    _tokenizer(f["m_chat"])
    (f["m_chat"] / "chat_template.jinja").write_text("{% for x in %}{{ x }}{% endfor %}")
    f["m_chat_runtime"] = _config(d / "m_chat_runtime")
    _tokenizer(f["m_chat_runtime"])
    (f["m_chat_runtime"] / "chat_template.jinja").write_text("{{ raise_exception('system role not allowed') }}")
    f["m_tokenizer_broken"] = _config(d / "m_tokenizer_broken")
    (f["m_tokenizer_broken"] / "tokenizer.json").write_text("{not a tokenizer")
    f["m_int_norm"] = _checkpoint(d / "m_int_norm", ("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    f["m_bool_norm"] = _checkpoint(d / "m_bool_norm", ("model.norm.weight", torch.ones(64, dtype=torch.bool)))
    nan = torch.full((TINY.hidden_size,), float("nan"))
    f["m_nan"] = _checkpoint(d / "m_nan", ("model.norm.weight", nan))
    f["m_truncated"] = _checkpoint(d / "m_truncated")
    blob = (f["m_truncated"] / "model.safetensors").read_bytes()
    (f["m_truncated"] / "model.safetensors").write_bytes(blob[:1000])
    # a real base file (tiny preset, -c 16) for the comparison cases
    f["base"] = d / "base.kld"
    assert main(["perplexity", "-f", str(f["text"]), "-c", "16", "--kl-divergence-base", str(f["base"]),
                 "--no-warmup"]) == 0
    f["m_vocab_2000"] = _config(d / "m_vocab_2000", vocab_size=2000)
    f["unwritable"] = d / "ro"
    f["unwritable"].mkdir()
    os.chmod(f["unwritable"], 0o500)
    return {k: str(v) for k, v in f.items()}


T = "{text}"
CASES = [
    # the command line itself
    [], ["nope"], ["sweep-bench", "--bogus"], ["sweep-bench", "-c"], ["plot"],
    # numbers: negative, zero, huge, not numbers
    ["sweep-bench", "-c", "-1"], ["sweep-bench", "-c", "0"], ["sweep-bench", "-c", "abc"], ["sweep-bench", "-c", "1.5"],
    ["sweep-bench", "-c", "1e9"], ["sweep-bench", "-c", "1000000000"], ["sweep-bench", "-c", "9" * 30],
    ["sweep-bench", "-ub", "0"], ["sweep-bench", "-ub", "-8"], ["sweep-bench", "-c", "64", "-ub", "100000"],
    ["sweep-bench", "-n", "0"], ["sweep-bench", "-c", "64", "-ub", "8", "-n", "1000"], ["sweep-bench", "--seed", "-1"],
    ["sweep-bench", "--n-layers", "0"], ["sweep-bench", "--n-layers", "1000"], ["sweep-bench", "--n-layers", "x"],
    ["sweep-bench", "-c", "4", "-ub", "8"],
    # names from a fixed list
    ["sweep-bench", "-ctk", "q5_1"], ["sweep-bench", "-ctv", "int4"], ["sweep-bench", "--attn", "flash"],
    ["sweep-bench", "--attn-prefill", "x"], ["sweep-bench", "--dtype", "f8"], ["sweep-bench", "--preset", "llama"],
    # devices
    ["sweep-bench", "--device", "tpu"], ["sweep-bench", "--device", "cuda:7"], ["sweep-bench", "--device", ""],
    ["sweep-bench", "--device", "cpu:abc"], ["sweep-bench", "--device", "meta"], ["--device", "cuda:7", "sweep-bench"],
    # memory: a big preset or context on this machine
    ["sweep-bench", "--preset", "glm-4.5"], ["sweep-bench", "--preset", "glm-4.5-air", "--n-layers", "46"],
    ["perplexity", "-f", T, "-c", "1000000000"], ["generate", "-p", "hi", "-c", "1000000000"],
    # output paths, checked before the sweep
    ["sweep-bench", "-c", "16", "-ub", "8", "-o", "{dir}"], ["sweep-bench", "-c", "16", "-ub", "8", "-o", "{no_dir_out}"],
    ["sweep-bench", "-c", "16", "-ub", "8", "-o", "{unwritable}/x.json"], ["sweep-bench", "-o", ""],
    # perplexity
    ["perplexity"], ["perplexity", "-f", "{missing}"], ["perplexity", "-f", "{dir}"], ["perplexity", "-f", "{empty}"],
    ["perplexity", "-f", "/dev/null"], ["perplexity", "-f", T, "-c", "2"], ["perplexity", "-f", T, "-c", "1000"],
    ["perplexity", "-f", T, "--chunks", "0"], ["perplexity", "-f", T, "-c", "16", "--kl-top-k", "1001",
                                                 "--kl-divergence-base", "{dir}/b.kld"],
    ["perplexity", "-f", T, "--kl-top-k", "0"], ["perplexity", "-f", T, "--kl-divergence-base", "{dir}"],
    ["perplexity", "-f", T, "--kl-divergence-base", "{no_dir_out}"], ["perplexity", "--kl-divergence"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{missing}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{dir}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{kld_garbage}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{kld_empty}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{text}"],
    # generate
    ["generate"], ["generate", "-p", "x", "-f", T], ["generate", "-p", ""], ["generate", "-f", "{empty}"],
    ["generate", "-f", "{dir}"], ["generate", "-f", "{missing}"], ["generate", "-p", "x", "-n", "-2"],
    ["generate", "-p", "x", "-n", "100", "-c", "16"], ["generate", "-p", "x", "--temp", "-1"],
    ["generate", "-p", "x", "--temp", "nan"], ["generate", "-p", "x", "--temp", "inf"], ["generate", "-p", "x", "--top-p", "2"],
    ["generate", "-p", "x", "--top-k", "-1"], ["generate", "-p", "x", "--min-p", "-0.1"], ["generate", "-p", "x", "-s", "-2"],
    ["generate", "-p", "x", "-s", "x"],
    # model directories
    ["generate", "-m", "{missing}", "-p", "x"], ["generate", "-m", "{m_file}", "-p", "x"],
    ["sweep-bench", "-m", "{m_file}"], ["sweep-bench", "-m", "{m_empty}"], ["sweep-bench", "-m", "{m_bad_json}"],
    ["sweep-bench", "-m", "{m_config_list}"], ["sweep-bench", "-m", "{m_config_dir}"],
    ["sweep-bench", "-m", "{m_rope_theta}"], ["sweep-bench", "-m", "{m_eos_token_id}"],
    ["sweep-bench", "-m", "{m_rope_scaling}"], ["sweep-bench", "-m", "{m_num_attention_heads}"],
    ["sweep-bench", "-m", "{m_num_hidden_layers}"], ["sweep-bench", "-m", "{m_vocab_size}"],
    ["sweep-bench", "-m", "{m_head_dim}"], ["sweep-bench", "-m", "{m_hidden_size}"],
    ["sweep-bench", "-m", "{m_rms_norm_eps}"], ["sweep-bench", "-m", "{m_model_type}"],
    ["sweep-bench", "-m", "{m_no_weights}", "-c", "16", "-ub", "8"], ["generate", "-m", "{m_empty}", "-p", "x"],
    ["generate", "-m", "{m_chat}", "-p", "hi", "--chat"], ["generate", "-m", "{m_chat_runtime}", "-p", "hi", "--chat"],
    ["generate", "-m", "{m_tokenizer_broken}", "-p", "x"], ["generate", "-m", "{m_no_weights}", "-p", "x", "--preset", "tiny"],
    ["sweep-bench", "-m", "{m_no_weights}", "--n-layers", "2"],
    ["sweep-bench", "-m", "{m_int_norm}", "-c", "16", "-ub", "8", "--no-warmup"],
    ["sweep-bench", "-m", "{m_bool_norm}", "-c", "16", "-ub", "8", "--no-warmup"],
    ["perplexity", "-m", "{m_nan}", "-f", "{letters}", "-c", "16", "--no-warmup"],
    ["generate", "-m", "{m_no_weights}", "-p", "a b c"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{base}", "-c", "32"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{base}", "-f", "{other_text}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{base}", "-m", "{m_vocab_2000}"],
    ["perplexity", "--kl-divergence", "--kl-divergence-base", "{base}", "--preset", "glm-4.5"],
    ["sweep-bench", "-m", "{m_truncated}", "-c", "16", "-ub", "8"],
    # plot
    ["plot", "{missing}", "-o", "{dir}/x.png"], ["plot", "{dir}", "-o", "{dir}/x.png"],
    ["plot", "{json_list}", "-o", "{dir}/x.png"], ["plot", "{json_strings}", "-o", "{dir}/x.png"],
    ["plot", "{json_broken}", "-o", "{dir}/x.png"], ["plot", "{binary}", "-o", "{dir}/x.png"],
    ["plot", "{json_list}", "-o", "{dir}"], ["plot", "{json_list}", "-o", "{no_dir_out}"],
    ["plot", "{json_list}", "{json_list}", "-o", "{dir}/x.png", "--labels", "one"],
    ["plot", "{m_config_dir}/config.json", "-o", "{dir}/x.png"], ["plot", "{json_list}", "-o", "{json_list}"],
    ["sweep-bench", "-c", "16", "-ub", "8", "-o", "{dir}/run.png"], ["sweep-bench", "-m", "{m_config_dir}"],
]


def _id(argv: list[str]) -> str:
    return " ".join(argv) or "(nothing)"


@pytest.mark.parametrize("argv", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(capsys, files, argv):
    if "{unwritable}" in " ".join(argv) and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    rc = main([a.format(**files) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and all(line.startswith(("error:", "warning:")) for line in lines), err
